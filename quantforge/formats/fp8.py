"""FP8 for vLLM: a compressed-tensors checkpoint with FP8 (e4m3) weights, one scale per output channel, and
activations scaled per token at run time (compressed-tensors' FP8_DYNAMIC scheme; RedHatAI's `-FP8-dynamic`
repos). vLLM reads it from `config.json` (`quant_method: compressed-tensors`) and runs it as W8A8 on GPUs with
FP8 tensor cores, weight-only on Ampere.

    source ─► fp8.quantize ─► fp8.verify ─► fp8.evaluate ─► gate ─► publish

quantize: compressed-tensors, called directly (formats/fp8_worker.py, a child process). llm-compressor, which
writes these checkpoints for RedHatAI, cannot be installed beside our pins (0.14 requires transformers <= 5.17;
we need >= 5.20); for FP8_DYNAMIC it only computes the weight scales and hands the model to compressed-tensors,
which is what the worker does, with a byte-identical result (docs/notes/mlx-fp8-research.md). No calibration
text: the scheme needs none. The whole model is loaded, in its own dtype.
verify: transformers loads the folder (compressed-tensors installed) and greedily generates; evaluate:
perplexity, KL divergence and top-1 agreement against the source on the harness's windows, through
transformers' default compressed-tensors forward: FP8 weights and per-token FP8 activations, as vLLM computes,
simulated in float32 on a CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..chat_template import has_chat_template
from ..config.schema import FormatSettings
from ..core.formats import AdhocArtifact, PlannedFormat, Publishable, PublishedArtifact, folder_files, register_format
from ..core.registry import Estimates, step_kind
from ..core.staleness import moved
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..errors import BadInputError, ToolchainError, VerificationError
from ..steps.evaluation import REFERENCE_FILE, SAMPLE_FILE, VERIFY_PROMPT, VERIFY_TOKENS, WINDOWS_FILE
from ..steps.gate import gate_step
from ..steps.source import external_folder
from ..toolchains.pins import tool_version
from ..toolchains.worker import run_worker
from . import fp8_estimates as estimates
from .fp8_card import CARD_TEMPLATE, render_fp8_card

if TYPE_CHECKING:
    from ..config.schema import ModelTarget
    from ..core.formats import CardInputs, EvalSteps, RepoFile

__all__ = ["DEFAULT_MAX_PPL_INCREASE", "FORMAT", "FP8Settings", "is_fp8_checkpoint"]

NAME = "fp8"
PACKAGE = "compressed-tensors"
WORKER = "quantforge.formats.fp8_worker"
CHECKPOINT_DIR = "checkpoint"
# The default gate. FP8_DYNAMIC measured +3.8% PPL (KLD 0.023) on SmolLM2-135M on the demo's windows, +4.9% on
# the research note's: a model unusually sensitive to quantization (GGUF Q4_K_M with an importance matrix: +4.4%).
# 8% passes a healthy checkpoint of a small model and refuses a broken one (wrong scales cost far more).
DEFAULT_MAX_PPL_INCREASE = 0.08
_NAME_OR_PATTERN = re.compile(r"[A-Za-z0-9_.]+")


class FP8Settings(FormatSettings):
    """`formats.fp8`: a compressed-tensors FP8 checkpoint for vLLM."""

    format_name = NAME

    scheme: Literal["dynamic"] = Field("dynamic", description="dynamic: FP8 weights with one scale per output "
                                       "channel, activations scaled per token when they run (compressed-tensors' "
                                       "FP8_DYNAMIC; no calibration text), the form of RedHatAI's "
                                       "`-FP8-dynamic` repos. Gated by default at max_ppl_increase 0.08.")
    ignore: list[str] = Field([], description="Linear layers to keep in the source's dtype, besides the output head "
                              "(always kept): a module name, or `re:` and a regular expression matched from the "
                              "start of the name (`re:.*down_proj$`). Each must match a layer.")

    @field_validator("ignore")
    @classmethod
    def _names_or_patterns(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as exc:
                    raise ValueError(f"{entry!r}: not a regular expression ({exc})") from None
            elif not _NAME_OR_PATTERN.fullmatch(entry):
                raise ValueError(f"{entry!r}: expected a module name such as model.layers.0.mlp.down_proj, or "
                                 "re:PATTERN")
        dupes = sorted({e for e in value if value.count(e) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        return value

    def card_settings(self) -> list[str]:
        return ["FP8 e4m3 weights, per-channel scales", "FP8 activations, scaled per token"]


def compressed_tensors_version() -> str:
    return tool_version(PACKAGE)


def plan(model: ModelTarget, settings: FP8Settings, source: Step, evaluation: EvalSteps, context: PlanContext,
         calibration) -> PlannedFormat:
    tools = {PACKAGE: context.memo(PACKAGE, compressed_tensors_version)}
    quantize = Step(kind="fp8.quantize", label=f"{model.name}/{NAME}:quantize",
                    params={**settings.model_dump(), "trust_remote_code": model.trust_remote_code},
                    inputs={"source": source}, tools=tools, model=model.name, fmt=NAME)
    verify = Step(kind="fp8.verify", label=f"{model.name}/{NAME}:verify",
                  params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS,
                          "trust_remote_code": model.trust_remote_code},
                  inputs={"artifact": quantize}, tools=tools, model=model.name, fmt=NAME)
    evaluate = evaluate_step(f"{model.name}/{NAME}:evaluate", quantize, evaluation, source, context, model.name,
                             model.trust_remote_code)
    gate = gate_step(f"{model.name}/{NAME}:gate", NAME, None, evaluate, verify, evaluation.settings,
                     DEFAULT_MAX_PPL_INCREASE, context.enforce_gates, model.name)
    return PlannedFormat(steps=[quantize, verify, evaluate, gate], publishable=[Publishable(NAME, quantize, gate)])


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  model: str = "", trust_remote_code: bool = False) -> Step:
    """Score `artifact` in transformers on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="fp8.evaluate", label=label, params={"trust_remote_code": trust_remote_code},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source},
                tools={PACKAGE: context.memo(PACKAGE, compressed_tensors_version)}, model=model, fmt=NAME)


def is_fp8_checkpoint(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a compressed-tensors checkpoint whose weights are 8-bit floats."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return False
    groups = quant.get("config_groups")
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    return bool(weights) and all(isinstance(w, dict) and (w.get("type"), w.get("num_bits")) == ("float", 8)
                                 for w in weights)


def adhoc(path: Path, source: Step, evaluation: EvalSteps, context: PlanContext) -> AdhocArtifact | None:
    """`quantforge eval DIR`: an FP8 compressed-tensors checkpoint made elsewhere (llm-compressor's, RedHatAI's),
    identified by its content. None for anything else: another format may know it."""
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not is_fp8_checkpoint(config):
        return None
    artifact = external_folder("fp8.external", path, context)
    return AdhocArtifact(NAME, artifact, evaluate_step(f"{path.name}:evaluate", artifact, evaluation, source,
                                                       context))


# --------------------------------------------------------------------------------------------------- steps

@step_kind("fp8.quantize", version="1", stage="artifact",
           estimates=Estimates(memory=estimates.quantize_memory, output_bytes=estimates.checkpoint_bytes,
                               seconds=estimates.quantize_seconds, host_floor=estimates.quantize_floor))
def run_quantize(step: Step, ctx: StepContext) -> dict[str, Any]:
    source_dir = Path(ctx.inputs["source"].data["path"])
    out = ctx.out_dir / CHECKPOINT_DIR
    args = ["quantize", str(source_dir), str(out), "--scheme", step.params["scheme"]]
    args += [f"--ignore={entry}" for entry in step.params["ignore"]]
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "quantize.result.json", progress=ctx.progress,
                        env=_env(), cwd=ctx.out_dir)
    if not result.pop("ok", False):
        if result.get("bad_input"):
            raise BadInputError(f"{step.model}: {result['error']}")
        raise ToolchainError(f"compressed-tensors FP8 quantization failed: {result.get('error', 'unknown')}")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    weight_bytes = sum((out / f).stat().st_size for f in files if f.endswith(".safetensors"))
    config = json.loads((out / "config.json").read_text())
    return {"scheme": step.params["scheme"], "dir": CHECKPOINT_DIR, "checkpoint_files": files, "size": size,
            "bits_per_weight": round(weight_bytes * 8 / result["n_params"], 3),
            "architecture": config.get("model_type"), "quantization_config": config.get("quantization_config"),
            "has_chat_template": has_chat_template(out), **result}


@step_kind("fp8.external", version="1", stage="artifact", check=moved)
def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.local["path"])
    return {"path": str(path), "quantization_config": json.loads((path / "config.json").read_text())
            ["quantization_config"]}


def checkpoint_path(artifact: StepOutput) -> Path:
    """A built checkpoint lives in its step folder; an external one (quantforge eval DIR) where it is."""
    if artifact.manifest.get("kind") == "fp8.external":
        return Path(artifact.data["path"])
    return artifact.file(artifact.data["dir"])


@step_kind("fp8.verify", version="1", stage="verify",
           estimates=Estimates(memory=estimates.consumer_memory, seconds=estimates.verify_seconds,
                               host_floor=estimates.consumer_floor))
def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    checkpoint = checkpoint_path(ctx.inputs["artifact"])
    args = ["generate", str(checkpoint), "--prompt", step.params["prompt"], "--tokens", str(step.params["tokens"])]
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "generate.result.json", env=_env(),
                        cwd=ctx.out_dir)
    if not result.pop("ok", False):
        raise VerificationError(f"transformers could not run {checkpoint.name}: {result.get('error', 'unknown')}")
    return result


@step_kind("fp8.evaluate", version="1", stage="evaluate",
           estimates=Estimates(memory=estimates.consumer_memory, seconds=estimates.evaluate_seconds,
                               host_floor=estimates.consumer_floor))
def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    checkpoint = checkpoint_path(ctx.inputs["artifact"])
    tokens = ctx.inputs["tokens"]
    args = ["evaluate", str(checkpoint), "--windows", str(tokens.file(WINDOWS_FILE)),
            "--reference", str(ctx.inputs["reference"].file(REFERENCE_FILE)), "--sample", str(tokens.file(SAMPLE_FILE))]
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "evaluate.result.json", progress=ctx.progress,
                        env=_env(), cwd=ctx.out_dir)
    if not result.pop("ok", False):
        raise VerificationError(f"transformers could not evaluate {checkpoint.name}: "
                                f"{result.get('error', 'unknown')}")
    source_has_template = ctx.inputs["source"].data.get("has_chat_template", False)
    result["chat_template_missing"] = bool(source_has_template and not result["chat_template"])
    return result


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress lines reach the log as they are printed


# ------------------------------------------------------------------------------------------------ the format

class FP8:
    name = NAME
    settings = FP8Settings
    card_template = CARD_TEMPLATE
    key_tools = (PACKAGE,)
    plan = staticmethod(plan)
    adhoc = staticmethod(adhoc)

    @staticmethod
    def published_files(output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact:
        return folder_files(output)

    @staticmethod
    def render_card(card: CardInputs) -> str:
        return render_fp8_card(card)

    @staticmethod
    def repo_files(card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
        return ()  # the checkpoint folder is the repo: its generation config travels with it


FORMAT = register_format(FP8())
