"""MLX through mlx-lm: the folder that `mlx_lm.generate` and LM Studio's MLX engine (Apple silicon) load, checked
by mlx-lm itself before it may be published.

    source ─► mlx.convert ─► mlx.verify ─► mlx.evaluate ─► gate ─► publish

convert: mlx-lm quantizes every linear layer and the embedding round-to-nearest, with a scale and a bias per group
of weights (MLX's affine mode), at one bit width or per layer by one of mlx-lm's mixed recipes; no calibration text.
The folder's config.json gets the RoPE keys mlx-lm reads, and its tokenizer files are the source's. verify: mlx-lm
loads the folder and greedily generates; evaluate: perplexity, KL divergence and top-1 agreement against the source
on the harness's windows, mlx-lm's tokenizer against the source's, and the chat template. mlx-lm runs in a child
process (formats/mlx_worker.py, the only module that imports mlx); what the steps cost is in formats/mlx_costs.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..card import eval_desc, measured, render_card
from ..chat_template import has_chat_template
from ..config.schema import FormatSettings, ModelTarget
from ..core.formats import (
    AdhocArtifact,
    CardInputs,
    EvalSteps,
    PlannedFormat,
    Publishable,
    PublishedArtifact,
    RepoFile,
    folder_files,
    register_format,
)
from ..core.registry import step_kind
from ..core.staleness import moved
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..errors import BadInputError, IncompatibleShapes, ToolchainError, VerificationError
from ..figures import format_size
from ..steps.evaluation import VERIFY_PROMPT, VERIFY_TOKENS, ScoringInputs
from ..steps.gate import gate_step
from ..steps.memory import source_shapes
from ..steps.source import external_folder, plan_config
from ..toolchains.pins import tool_version
from ..toolchains.worker import run_worker
from . import mlx_costs

WORKER = "quantforge.formats.mlx_worker"
MLX_DIR = "mlx"
CARD_TEMPLATE = "mlx_card.md.jinja"
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx-lm's convert.QUANT_RECIPES
GROUP_SIZES = (32, 64, 128)  # what MLX's affine kernels take
CONVERT_STAGE = re.compile(r"^\[INFO\] (Loading|Quantizing)", re.MULTILINE)  # what mlx-lm's convert prints
# Default gate by bit width (a mixed recipe: its lower one). Round-to-nearest with a scale and a bias per group of
# 64 is llama.cpp's Q4_1/Q5_1 scheme, without calibration: the same limits as those types (Q8_0 2%, Q6_K 4%, Q5_1
# 8%, Q4_1 25%), looser below. Small models suffer far more (SmolLM2-135M at 4 bits: +50%; at 8 bits: +0.14%).
DEFAULT_MAX_PPL_INCREASE_BY_BITS = {8: 0.02, 6: 0.04, 5: 0.08, 4: 0.25, 3: 0.5, 2: 1.5}


class MLXSettings(FormatSettings):
    """`formats.mlx`: an MLX folder made by mlx-lm, for `mlx_lm.generate` and LM Studio on Apple silicon."""

    format_name = "mlx"

    bits: Literal[2, 3, 4, 5, 6, 8] = Field(4, description="Bits per weight of every quantized layer. Unless "
                                            "`evaluation.max_ppl_increase` says otherwise, the gate allows 8-bit "
                                            "+2%, 6-bit +4%, 5-bit +8%, 4-bit +25%, 3-bit +50%, 2-bit +150%.")
    group_size: Literal[32, 64, 128] = Field(64, description="Weights that share one scale and bias. Must divide "
                                             "every layer's input size (checked at plan, and after converting: "
                                             "mlx-lm would leave such a layer unquantized).")
    recipe: Literal[RECIPES] | None = Field(  # type: ignore[valid-type]
        None, description="One of mlx-lm's mixed recipes instead of one bit width: mixed_L_H quantizes most layers to "
        "L bits, and v_proj and down_proj in an eighth of the layers at each end and every third between, and "
        "lm_head, to H.")
    dtype: Literal["auto", "bfloat16", "float16"] = Field(
        "auto", description="The scales', biases' and unquantized weights' dtype (auto: the source's when it is "
        "16-bit, else bfloat16, which mlx-community ships).")

    @model_validator(mode="after")
    def _recipe_sets_the_bits(self) -> MLXSettings:
        if self.recipe and "bits" in self.model_fields_set:
            raise ValueError(f"recipe {self.recipe} sets each layer's bits; drop bits")
        return self

    def low_bits(self) -> int:
        """The fewest bits a quantized layer gets: what the default gate goes by."""
        return int(self.recipe.split("_")[1]) if self.recipe else self.bits

    def repo_label(self) -> str:
        # LM Studio's community repos: <model>-GGUF beside <model>-MLX-4bit, one repo per bit width
        return f"MLX-{self.recipe.replace('_', '-')}" if self.recipe else f"MLX-{self.bits}bit"

    def card_settings(self) -> list[str]:
        bits = f"{self.recipe} (mostly {self.low_bits()}-bit)" if self.recipe else f"{self.bits}-bit"
        return [bits, f"group size {self.group_size}", "affine (a scale and a bias per group)"]


# ------------------------------------------------------------------------------------------------ plan

def plan(model: ModelTarget, target: MLXSettings, source: Step, evaluation: EvalSteps, context: PlanContext,
         calibration: Any) -> PlannedFormat:
    check_source(model.name, target, source, context)
    tools = _tools(context)
    convert = Step(kind="mlx.convert", label=f"{model.name}/mlx:convert",
                   params={**target.model_dump(), "trust_remote_code": model.trust_remote_code},
                   inputs={"source": source}, tools=tools, model=model.name, fmt="mlx")
    verify = Step(kind="mlx.verify", label=f"{model.name}/mlx:verify",
                  params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS,
                          "trust_remote_code": model.trust_remote_code}, inputs={"artifact": convert},
                  tools=tools, model=model.name, fmt="mlx")
    evaluate = evaluate_step(f"{model.name}/mlx:evaluate", convert, evaluation, source, context, model.name,
                             model.trust_remote_code)
    gate = gate_step(f"{model.name}/mlx:gate", "mlx", None, evaluate, verify, evaluation.settings,
                     DEFAULT_MAX_PPL_INCREASE_BY_BITS[target.low_bits()], context.enforce_gates, model.name)
    return PlannedFormat(steps=[convert, verify, evaluate, gate], publishable=[Publishable("mlx", convert, gate)])


KEY_TOOLS = ("mlx-lm", "mlx")  # mlx-lm converts, loads and generates; mlx computes


def _tools(context: PlanContext) -> dict[str, str]:
    return {name: context.memo(name, lambda name=name: tool_version(name)) for name in KEY_TOOLS}


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  model: str = "", trust_remote_code: bool = False) -> Step:
    """Score `artifact` in mlx-lm on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="mlx.evaluate", label=label, params={"trust_remote_code": trust_remote_code},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source}, tools=_tools(context), model=model, fmt="mlx")


def check_source(model: str, target: MLXSettings, source: Step, context: PlanContext) -> None:
    """Refuse at plan time, where the source's config.json is here, what mlx-lm cannot make: an architecture it has
    no implementation of, a group size that does not divide the hidden or MLP size."""
    config = plan_config(source)
    if config is None:
        return  # a Hub source not fetched yet: the convert step says so instead
    model_type = config.get("model_type")
    if context.memo(f"mlx-lm knows {model_type}", lambda: mlx_lm_knows(model_type)) is False:
        what = f"model_type {model_type!r}" if model_type else "a model without a model_type"
        raise BadInputError(f"{model}: mlx-lm {tool_version('mlx-lm')} has no implementation of {what} "
                            "(config.json); remove formats.mlx from this model, or upgrade mlx-lm")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    sizes = {key: text[key] for key in ("hidden_size", "intermediate_size") if isinstance(text.get(key), int)}
    for key, size in sizes.items():
        if size % target.group_size:
            working = [g for g in GROUP_SIZES if all(s % g == 0 for s in sizes.values())]
            raise BadInputError(f"{model}: formats.mlx.group_size {target.group_size} does not divide the model's "
                                f"{key} {size} (config.json), and mlx-lm would leave the layers reading it "
                                f"unquantized; use {' or '.join(map(str, working)) or 'another format'}")


def mlx_lm_knows(model_type: Any) -> bool | None:
    """Whether the installed mlx-lm implements `model_type` (its models/<type>.py, after its own renaming table),
    read from its files without importing it (that takes seconds); None when mlx-lm is not installed here."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    remapping: dict[str, str] = {}
    try:
        for node in ast.parse((root / "utils.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
                remapping = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        return None  # a layout this code does not know: the convert step says it instead
    if not isinstance(model_type, str) or not model_type:
        return False
    return (root / "models" / f"{remapping.get(model_type, model_type)}.py").is_file()


# ------------------------------------------------------------------------------------------------ steps

@step_kind("mlx.convert", version="1", stage="artifact", estimates=mlx_costs.CONVERT)
def run_convert(step: Step, ctx: StepContext) -> dict[str, Any]:
    source_dir = Path(ctx.inputs["source"].data["path"])
    settings = MLXSettings.model_validate({k: v for k, v in step.params.items() if k in MLXSettings.model_fields})
    dtype = source_dtype(source_dir) if settings.dtype == "auto" else settings.dtype
    out = ctx.out_dir / MLX_DIR
    args = ["convert", str(source_dir), str(out), "--bits", str(settings.low_bits()), "--group-size",
            str(settings.group_size), "--dtype", dtype]
    args += ["--recipe", settings.recipe] if settings.recipe else []
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "convert.result.json", progress=ctx.progress,
                        patterns=[(CONVERT_STAGE, lambda m: m[1].lower())])
    if not result.pop("ok", False):
        if "unsupported" in result:
            raise BadInputError(f"{step.model}: mlx-lm {step.tools['mlx-lm']} has no implementation of model_type "
                                f"{result['unsupported']!r}; remove formats.mlx from this model, or upgrade mlx-lm")
        raise ToolchainError(f"mlx-lm could not convert {step.model}: {result.get('error', 'unknown')}")
    misfit = {name: size for name, size in result["unquantized_layers"].items() if size % settings.group_size}
    if misfit:
        name, size = next(iter(misfit.items()))
        others = f" and {len(misfit) - 1} more" if len(misfit) > 1 else ""
        working = [g for g in GROUP_SIZES if all(s % g == 0 for s in result["input_sizes"])]
        raise IncompatibleShapes(f"group_size {settings.group_size} does not divide the input size {size} of {name}"
                                 f"{others}: mlx-lm left them unquantized",
                                 hint=f"formats.mlx.group_size: {' or '.join(map(str, working)) or 'none fits'}")
    config = json.loads((out / "config.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    n_params = source_shapes(source_dir).params
    return {**settings.model_dump(), "dtype": dtype, "dir": MLX_DIR, "files": files,
            "size": sum((out / f).stat().st_size for f in files), "n_params": n_params,
            "bits_per_weight": round(result["weight_bytes"] * 8 / n_params, 3),
            "quantization": {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)},
            "has_chat_template": has_chat_template(out), **result}


def source_dtype(source_dir: Path) -> str:
    """`dtype: auto`: the source's own 16-bit dtype, else bfloat16 (mlx-lm reads only the `torch_dtype` that
    transformers 4 wrote, so an unset dtype would keep a transformers 5 checkpoint's scales in float32)."""
    try:
        config = json.loads((source_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return found if found in ("bfloat16", "float16") else "bfloat16"


def artifact_path(artifact: StepOutput) -> Path:
    """A built folder lives in its step's folder; an external one (quantforge eval DIR) where it is."""
    if artifact.manifest.get("kind") == "mlx.external":
        return Path(artifact.data["path"])
    return artifact.file(artifact.data["dir"])


@step_kind("mlx.verify", version="1", stage="verify", estimates=mlx_costs.VERIFY)
def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    folder = artifact_path(ctx.inputs["artifact"])
    args = ["generate", str(folder), "--prompt", step.params["prompt"], "--tokens", str(step.params["tokens"])]
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "generate.result.json")
    if not result.pop("ok", False):
        raise VerificationError(f"mlx-lm could not run {step.model or folder.name}: {result.get('error', 'unknown')}")
    if not result["generated_ids"]:
        raise VerificationError(f"{step.model or folder.name}: mlx-lm generated no token (its first choice was "
                                f"end-of-sequence) after {step.params['prompt']!r}")
    return result


@step_kind("mlx.evaluate", version="1", stage="evaluate", estimates=mlx_costs.EVALUATE)
def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    folder = artifact_path(ctx.inputs["artifact"])
    scoring = ScoringInputs.of(ctx.inputs)
    args = ["evaluate", str(folder), "--windows", str(scoring.windows), "--reference", str(scoring.reference),
            "--sample", str(scoring.sample)]
    args += ["--trust-remote-code"] if step.params["trust_remote_code"] else []
    result = run_worker(WORKER, args, ctx.log_path, ctx.out_dir / "evaluate.result.json", progress=ctx.progress)
    if not result.pop("ok", False):
        raise VerificationError(f"mlx-lm could not evaluate {step.model or folder.name}: "
                                f"{result.get('error', 'unknown')}")
    result["chat_template_missing"] = scoring.chat_template_missing(result["chat_template"])
    return result


def adhoc(path: Path, source: Step, evaluation: EvalSteps, context: PlanContext) -> AdhocArtifact | None:
    """`quantforge eval DIR`: an MLX folder made elsewhere (its config.json has mlx-lm's `quantization` block),
    identified by its content; None for any other path."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(config, dict) and isinstance(config.get("quantization"), dict)
            and {"bits", "group_size"} <= config["quantization"].keys()):
        return None
    artifact = external_folder("mlx.external", path, context)
    return AdhocArtifact("mlx", artifact, evaluate_step(f"{path.name}:evaluate", artifact, evaluation, source,
                                                        context))


@step_kind("mlx.external", version="1", stage="artifact", check=moved)
def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.local["path"])
    config = json.loads((path / "config.json").read_text())
    return {"path": str(path), "architecture": config.get("model_type"),
            "quantization": {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)}}


# ------------------------------------------------------------------------------------------------ publishing

def render_mlx_card(card: CardInputs) -> str:
    built = card.artifacts[0]
    q, g = built.output.data, built.gate.data
    settings = MLXSettings.model_validate({k: q[k] for k in MLXSettings.model_fields if k in q})
    arch = q.get("architecture")
    unquantized = list(q.get("unquantized_layers", {}))
    return render_card(
        CARD_TEMPLATE, card.source, card.namespace, "mlx",
        {"mlx", f"{settings.low_bits()}-bit", *([arch] if arch else [])}, card.release,
        repo_id=card.repo_id, model=card.model, settings=", ".join(settings.card_settings()),
        bits_label=settings.recipe or f"{settings.bits}-bit", dtype=q.get("dtype", "?"),
        size=format_size(q["size"]), **measured(q, g),
        source_ppl=f"{g['source_ppl']:.3f}" if "source_ppl" in g else "-",
        tokens_scored=g.get("tokens_scored", 0), eval_desc=eval_desc(card.tokens),
        compute=g.get("compute_dtype", "?"), device=str(g.get("device", "?")).upper(), unquantized=unquantized,
        convert_seconds=f"{q.get('convert_seconds', 0):.0f}", mlx_lm=built.output.tools.get("mlx-lm", "?"),
        mlx=built.output.tools.get("mlx", "?"),
    )


class MLX:
    name = "mlx"
    settings = MLXSettings
    card_template = CARD_TEMPLATE
    key_tools = KEY_TOOLS
    plan = staticmethod(plan)
    adhoc = staticmethod(adhoc)
    render_card = staticmethod(render_mlx_card)

    @staticmethod
    def published_files(output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact:
        # the folder is one model, as mlx-lm and LM Studio load a repo; mlx-lm shards its weights at 5 GB itself
        return folder_files(output)

    @staticmethod
    def repo_files(card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
        return ()  # the folder is the repo: its generation config already travels with it


FORMAT = register_format(MLX())
