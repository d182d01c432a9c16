"""Quantized Hugging Face checkpoints made by GPTQModel, checked by their real consumer, transformers, before
they may be published: the machinery GPTQModel's methods share. Each method is a format of its own
(formats/gptq.py, formats/awq.py) that registers its quantize kind and says, in its settings model, what
GPTQModel is asked for and what the card shows, and in its format class which runtimes load it.

    source ─► calibration ─► <method>.quantize ─► checkpoint.verify ─► checkpoint.evaluate ─► gate ─► publish

quantize: the group size is checked against every layer first, then GPTQModel runs in its own process;
verify: transformers loads the folder (GPTQModel's kernels) and greedily generates; evaluate: perplexity, KL
divergence and top-1 agreement against the source on the harness's windows, the saved tokenizer against the
source's, and the chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from ..card import calibration_desc, calibration_text, eval_desc, hub_url, measured, render_card
from ..chat_template import has_chat_template
from ..config.schema import ModelTarget
from ..core.formats import (
    AdhocArtifact,
    CardInputs,
    EvalSteps,
    PlannedFormat,
    Publishable,
    PublishedArtifact,
    RepoFile,
    folder_files,
    format_named,
)
from ..core.registry import Estimates, step_kind
from ..core.staleness import moved
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..errors import BadInputError
from ..figures import format_size
from ..steps.calibration import CALIBRATION_FILE, calibration_settings
from ..steps.disk import SourceSize, output_bytes
from ..steps.evaluation import VERIFY_PROMPT, VERIFY_TOKENS, ScoringInputs
from ..steps.gate import gate_step
from ..steps.memory import StepMemory, source_shapes
from ..steps.rates import COPY_RATE, TORCH_RATE, compute_cores, step_tokens, token_shape
from ..steps.source import external_folder, hub_commit
from ..toolchains import gptqmodel
from ..toolchains.memory import HostMemory

CHECKPOINT_DIR = "checkpoint"
# RSS of GPTQModel's worker before it holds any of the model (torch, transformers, gptqmodel imported)
GPTQMODEL_BASELINE = 900 * 2**20
# parameter-tokens per second per core: SmolLM2 135M, 32 x 512 calibration tokens, GPTQ in 16 min on 2 cores
GPTQ_RATE = 135e6 * 32 * 512 / (16 * 60) / 2
# default gate by bit width: the largest relative perplexity increase over the source on the same windows
DEFAULT_MAX_PPL_INCREASE_BY_BITS = {8: 0.02, 4: 0.12, 3: 0.35, 2: 1.0}
CALIBRATION_FIELDS = ("samples", "seq_len", "dataset")


class CheckpointSettings(Protocol):
    """What a GPTQModel format's settings model offers (formats/gptq.py, formats/awq.py)."""

    bits: int
    group_size: int
    samples: int | None
    seq_len: int | None
    dataset: str | None

    def quantize_params(self) -> dict[str, Any]: ...

    def gptqmodel_config(self) -> dict[str, Any]: ...

    def card_settings(self) -> list[str]: ...


def plan_checkpoint(method: str, target: CheckpointSettings, model: ModelTarget, source: Step,
                    evaluation: EvalSteps, context: PlanContext, calibration) -> PlannedFormat:
    hidden = hidden_size(source)
    if hidden is not None and target.group_size > hidden:  # every layer reading the hidden state would misfit
        raise BadInputError(f"{model.name}: formats.{method}.group_size {target.group_size} is larger than the "
                            f"model's hidden size {hidden} (config.json); use -1 (one group per row) or a size that "
                            "divides it, such as 32, 64 or 128")
    tools = {"gptqmodel": context.memo("gptqmodel", gptqmodel.gptqmodel_version)}
    calib = calibration(dataset=target.dataset, samples=target.samples, seq_len=target.seq_len)
    quantize = Step(kind=f"{method}.quantize", label=f"{model.name}/{method}:quantize",
                    params={**target.quantize_params(), "trust_remote_code": model.trust_remote_code},
                    inputs={"source": source, "calibration": calib}, tools=tools, model=model.name, fmt=method)
    verify = Step(kind="checkpoint.verify", label=f"{model.name}/{method}:verify",
                  params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS,
                          "trust_remote_code": model.trust_remote_code}, inputs={"artifact": quantize},
                  tools=tools, model=model.name, fmt=method)
    evaluate = evaluate_step(f"{model.name}/{method}:evaluate", quantize, evaluation, source, context, method,
                             model.name, model.trust_remote_code)
    gate = gate_step(f"{model.name}/{method}:gate", method, None, evaluate, verify, evaluation.settings,
                     DEFAULT_MAX_PPL_INCREASE_BY_BITS.get(target.bits), context.enforce_gates, model.name)
    return PlannedFormat(steps=[quantize, verify, evaluate, gate],
                         publishable=[Publishable(method, quantize, gate)])


def hidden_size(source: Step) -> int | None:
    """The source model's hidden size from its config.json, where that is on this machine at plan time (a local
    folder, or a Hub source's file in the HF cache); None otherwise."""
    folder = source.local.get("folder")
    if folder:
        config_file: str | Path | None = Path(folder) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        config_file = try_to_load_from_cache(source.params["source"], "config.json", revision=hub_commit(source))
    try:
        config = json.loads(Path(config_file).read_text()) if isinstance(config_file, str | Path) else {}
        return int(config.get("text_config", config)["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  method: str, model: str = "", trust_remote_code: bool = False) -> Step:
    """Score `artifact` in transformers on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="checkpoint.evaluate", label=label, params={"trust_remote_code": trust_remote_code},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source},
                tools={"gptqmodel": context.memo("gptqmodel", gptqmodel.gptqmodel_version)}, model=model, fmt=method)


def adhoc(method: str, path: Path, source: Step, evaluation: EvalSteps, context: PlanContext
          ) -> AdhocArtifact | None:
    """`quantforge eval DIR`: a checkpoint of `method` made elsewhere, identified by its content; None for any
    other folder (another format's, or none)."""
    try:
        config = _json_file(path / "config.json")
    except (OSError, ValueError, AttributeError):
        return None
    if (config.get("quantization_config") or {}).get("quant_method") != method:
        return None
    artifact = external_folder("checkpoint.external", path, context)
    return AdhocArtifact(method, artifact, evaluate_step(f"{path.name}:evaluate", artifact, evaluation, source,
                                                         context, method))


@step_kind("checkpoint.external", version="2", stage="artifact", check=moved)
def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.local["path"])
    return {"path": str(path), "quantization_config": _json_file(path / "config.json")["quantization_config"]}


def run_quantize(step: Step, ctx: StepContext) -> dict[str, Any]:
    """Every method's `<method>.quantize` (registered by its format module)."""
    method = step.kind.split(".")[0]
    source_dir = Path(ctx.inputs["source"].data["path"])
    # fail in a second, naming the layer, rather than after an hour of calibration
    layers, n_params = gptqmodel.quantized_linears(source_dir, step.params["trust_remote_code"], ctx.log_path)
    gptqmodel.check_shapes(method, step.params["group_size"], layers)
    out = ctx.out_dir / CHECKPOINT_DIR
    settings = {k: v for k, v in step.params.items() if k != "trust_remote_code"}
    config_kwargs = format_named(method).settings.model_validate(settings).gptqmodel_config()
    result = gptqmodel.quantize(method, source_dir, out, ctx.inputs["calibration"].file(CALIBRATION_FILE),
                                config_kwargs, step.params["trust_remote_code"], ctx.log_path, ctx.out_dir,
                                progress=ctx.progress)
    shutil.rmtree(ctx.out_dir / "offload", ignore_errors=True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    config = _json_file(out / "config.json")
    n_weights = sum(n_in * n_out for n_in, n_out in layers.values())
    return {"method": method, **settings, "calibration": calibration_settings(ctx.inputs["calibration"]),
            "dir": CHECKPOINT_DIR, "checkpoint_files": files, "size": size,
            "quantized_layers": len(layers), "quantized_weights": n_weights, "n_params": n_params,
            "bits_per_weight": round(size * 8 / n_params, 3),
            "architecture": config.get("model_type"), "quantization_config": config.get("quantization_config"),
            "has_chat_template": has_chat_template(out), **result}


def _json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def checkpoint_path(artifact: StepOutput) -> Path:
    """A built checkpoint lives in its step folder; an external one (quantforge eval DIR) where it is."""
    if artifact.manifest.get("kind") == "checkpoint.external":
        return Path(artifact.data["path"])
    return artifact.file(artifact.data["dir"])


# ------------------------------------------------------------------------------------------------ what it costs

def _quantize_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    shapes = source_shapes(source_dir)
    samples, seq_len = token_shape(step)
    # GPTQModel loads the whole model in fp16 in host memory, on a GPU too (it moves one layer at a time there);
    # plus the calibration activations entering and leaving a layer (fp16) and one layer's Hessians (fp32,
    # input size squared per linear layer)
    activations = 2 * samples * seq_len * shapes.hidden * 2
    hessians = 4 * (3 * shapes.hidden ** 2 + shapes.intermediate ** 2)
    host_bytes = GPTQMODEL_BASELINE + 2 * shapes.params + activations + hessians
    on_gpu = None if gpu is None else 2 * shapes.layer_params * 2 + activations + hessians
    return StepMemory(step.label, step.kind, host_bytes, on_gpu,
                      "GPTQModel loads the whole model in fp16 in host memory")


def _checkpoint_bytes(step: Step, size: SourceSize) -> int:
    # quantized linear layers plus the embeddings and head kept in 16 bits: an upper bound for large models
    bits = int(step.params.get("bits", 4))
    return int(size.params * 2 * min(1.0, bits / 16 + 0.15)) + size.vocab_bytes


def quantize_estimates(slower: float = 1.0) -> Estimates:
    """A GPTQModel method's quantize step; `slower`: its time per calibration token against GPTQ's."""
    return Estimates(
        memory=_quantize_memory, output_bytes=_checkpoint_bytes,
        seconds=lambda step, size, cores, gpu:
            size.params * step_tokens(step) * slower / (GPTQ_RATE * compute_cores(cores, gpu)),
        # before the source's shapes are known: the whole model in fp16, besides the worker
        host_floor=lambda step, size: (GPTQMODEL_BASELINE + 2 * size.params,
                                       "GPTQModel loads the whole model in fp16; more with its calibration, which "
                                       "the source's shapes tell once here"))


# ------------------------------------------------------------------------------------------------ runners

@step_kind("checkpoint.verify", version="1", stage="verify", estimates=Estimates(
    seconds=lambda step, size, cores, gpu: output_bytes(step.inputs["artifact"], size) / COPY_RATE))
def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    return gptqmodel.load_and_generate(checkpoint_path(ctx.inputs["artifact"]), step.params["prompt"],
                                       step.params["tokens"], ctx.log_path, ctx.out_dir,
                                       step.params["trust_remote_code"])


# transformers with GPTQModel's kernels: as slow as a torch forward in fp32
@step_kind("checkpoint.evaluate", version="1", stage="evaluate", estimates=Estimates(
    seconds=lambda step, size, cores, gpu:
        size.params * step_tokens(step) / (TORCH_RATE * compute_cores(cores, gpu))))
def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    scoring = ScoringInputs.of(ctx.inputs)
    result = gptqmodel.evaluate(checkpoint_path(ctx.inputs["artifact"]), scoring.windows, scoring.reference,
                                scoring.sample, ctx.log_path, ctx.out_dir, step.params["trust_remote_code"],
                                progress=ctx.progress)
    result["chat_template_missing"] = scoring.chat_template_missing(result["chat_template"])
    return result


class CheckpointFormat:
    """A format GPTQModel makes (formats/gptq.py, formats/awq.py): a subclass names it and its settings."""

    name: str
    settings: type[Any]
    card_template = "checkpoint_card.md.jinja"
    key_tools = (gptqmodel.PACKAGE,)

    def plan(self, model: ModelTarget, settings: CheckpointSettings, source: Step, evaluation: EvalSteps,
             context: PlanContext, calibration) -> PlannedFormat:
        return plan_checkpoint(self.name, settings, model, source, evaluation, context, calibration)

    def published_files(self, output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact:
        return folder_files(output)

    def render_card(self, card: CardInputs) -> str:
        return render_checkpoint_card(card, self)

    def runtimes(self, bits: int) -> list[str]:
        """Which runtimes load this method's checkpoints (Markdown lines), besides llama.cpp's refusal."""
        raise NotImplementedError

    def repo_files(self, card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
        return ()  # the checkpoint folder is the repo: its generation config already travels with it

    def adhoc(self, path: Path, source: Step, evaluation: EvalSteps, context: PlanContext) -> AdhocArtifact | None:
        return adhoc(self.name, path, source, evaluation, context)


def render_checkpoint_card(card: CardInputs, fmt: CheckpointFormat) -> str:
    """The card of a GPTQModel repo: one checkpoint, its settings, its measurements, and how to load it."""
    built = card.artifacts[0]
    q, g = built.output.data, built.gate.data
    arch = q.get("architecture")
    settings = fmt.settings.model_validate({k: q[k] for k in fmt.settings.model_fields if k in q})
    gguf = dict(card.release.siblings).get("gguf")
    gguf_link = f"[{gguf}]({hub_url(gguf)})" if gguf else "a GGUF build of the model"
    compatibility = [*fmt.runtimes(q["bits"]),
                     f"**llama.cpp, Ollama, LM Studio** do not load {fmt.name.upper()} checkpoints: use {gguf_link}"]
    name = fmt.name
    return render_card(
        fmt.card_template, card.source, card.namespace, "transformers",
        {name, f"{q['bits']}-bit", "gptqmodel", *([arch] if arch else [])}, card.release,
        repo_id=card.repo_id, model=card.model, fmt=name, FMT=name.upper(), compatibility=compatibility,
        settings=", ".join(settings.card_settings()), size=format_size(q["size"]), **measured(q, g),
        source_ppl=f"{g['source_ppl']:.3f}" if "source_ppl" in g else "-",
        tokens_scored=g.get("tokens_scored", 0), eval_desc=eval_desc(card.tokens),
        calibration=calibration_desc(q.get("calibration")), calibration_text=calibration_text(q.get("calibration")),
        device=q.get("device", "?"),
        quantize_minutes=f"{q.get('quantize_seconds', 0) / 60:.1f}",
        gptqmodel=built.output.tools.get("gptqmodel", "?"),
    )

