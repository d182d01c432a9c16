"""Quantized Hugging Face checkpoints made by GPTQModel (GPTQ and AWQ share everything but their settings),
checked by their real consumer, transformers, before they may be published.

    source ─► calibration ─► <method>.quantize ─► checkpoint.verify ─► checkpoint.evaluate ─► gate ─► publish

quantize: the group size is checked against every layer first, then GPTQModel runs in its own process;
verify: transformers loads the folder (GPTQModel's kernels) and greedily generates; evaluate: perplexity, KL
divergence and top-1 agreement against the source on the harness's windows, the saved tokenizer against the
source's, and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..calibrate import CALIBRATION_FILE
from ..config import AWQTarget, GPTQTarget, ModelTarget
from ..evaluate import REFERENCE_FILE, SAMPLE_FILE, WINDOWS_FILE, EvalSteps, gate_step
from ..plan import PlanContext, Step
from ..toolchains import gptqmodel
from . import PlannedFormat

if TYPE_CHECKING:
    from ..engine import StepContext

CHECKPOINT_DIR = "checkpoint"
VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 8
# default gate by bit width: the largest relative perplexity increase over the source on the same windows
DEFAULT_MAX_PPL_INCREASE = {8: 0.02, 4: 0.12, 3: 0.35, 2: 1.0}


def plan_checkpoint(method: str, settings: dict[str, Any], model: ModelTarget, target: GPTQTarget | AWQTarget,
                    source: Step, evaluation: EvalSteps, context: PlanContext,
                    calibration: Callable[..., Step]) -> PlannedFormat:
    tools = {"gptqmodel": context.memo("gptqmodel", gptqmodel.gptqmodel_version)}
    calib = calibration(dataset=target.dataset, samples=target.samples, seq_len=target.seq_len)
    quantize = Step(kind=f"{method}.quantize", label=f"{model.name}/{method}:quantize",
                    params={**settings, "trust_remote_code": model.trust_remote_code},
                    inputs={"source": source, "calibration": calib}, tools=tools, model=model.name, fmt=method)
    verify = Step(kind="checkpoint.verify", label=f"{model.name}/{method}:verify",
                  params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS,
                          "trust_remote_code": model.trust_remote_code}, inputs={"artifact": quantize},
                  tools=tools, model=model.name, fmt=method)
    evaluate = evaluate_step(f"{model.name}/{method}:evaluate", quantize, evaluation, source, context, method,
                             model.name, model.trust_remote_code)
    gate = gate_step(f"{model.name}/{method}:gate", method, None, evaluate, verify, evaluation.settings,
                     DEFAULT_MAX_PPL_INCREASE.get(target.bits), context.enforce_gates, model.name)
    out = PlannedFormat(steps=[quantize, verify, evaluate, gate])
    out.publishable[method] = (quantize, gate)
    return out


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  method: str, model: str = "", trust_remote_code: bool = False) -> Step:
    """Score `artifact` in transformers on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="checkpoint.evaluate", label=label, params={"trust_remote_code": trust_remote_code},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source},
                tools={"gptqmodel": context.memo("gptqmodel", gptqmodel.gptqmodel_version)}, model=model, fmt=method)


def external_step(path: Path, context: PlanContext) -> tuple[Step, str]:
    """A GPTQ or AWQ checkpoint made elsewhere, identified by its content, as the input of an ad-hoc evaluation;
    and its method."""
    from ..errors import BadInputError
    from ..sources import DEFAULT_ALLOW_PATTERNS, local_digest

    try:
        config = _json_file(path / "config.json")
    except (OSError, ValueError):
        raise BadInputError(f"{path}: no readable config.json; expected a GPTQ or AWQ checkpoint folder") from None
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in ("gptq", "awq"):
        raise BadInputError(f"{path}: config.json has quant_method {method!r}; expected gptq or awq")
    digest = context.memo(f"local:{path}", lambda: local_digest(path, list(DEFAULT_ALLOW_PATTERNS),
                                                                 context.work.root))
    return Step(kind="checkpoint.external", label=f"{path.name}:artifact",
                params={"path": str(path), "digest": digest}), method


def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.params["path"])
    return {"path": str(path), "quantization_config": _json_file(path / "config.json")["quantization_config"]}


def run_quantize(step: Step, ctx: StepContext) -> dict[str, Any]:
    import shutil

    from ..card import chat_template

    method = step.kind.split(".")[0]
    source_dir = Path(ctx.inputs["source"].data["path"])
    # fail in a second, naming the layer, rather than after an hour of calibration
    layers, n_params = gptqmodel.quantized_linears(source_dir, step.params["trust_remote_code"])
    gptqmodel.check_shapes(method, step.params["group_size"], layers)
    out = ctx.out_dir / CHECKPOINT_DIR
    settings = {k: v for k, v in step.params.items() if k != "trust_remote_code"}
    result = gptqmodel.quantize(method, source_dir, out, ctx.inputs["calibration"].file(CALIBRATION_FILE),
                                dict(step.params), ctx.log_path, ctx.out_dir, progress=ctx.progress)
    shutil.rmtree(ctx.out_dir / "offload", ignore_errors=True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    config = _json_file(out / "config.json")
    n_weights = sum(n_in * n_out for n_in, n_out in layers.values())
    calibration = {k: ctx.inputs["calibration"].manifest["params"][k] for k in ("dataset", "samples", "seq_len")}
    return {"method": method, **settings, "calibration": calibration, "dir": CHECKPOINT_DIR,
            "checkpoint_files": files, "size": size,
            "quantized_layers": len(layers), "quantized_weights": n_weights, "n_params": n_params,
            "bits_per_weight": round(size * 8 / n_params, 3),
            "architecture": config.get("model_type"), "quantization_config": config.get("quantization_config"),
            "has_chat_template": chat_template(out) is not None, **result}


def _json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def checkpoint_path(artifact) -> Path:
    """A built checkpoint lives in its step folder; an external one (quantforge eval DIR) where it is."""
    return Path(artifact.data["path"]) if "path" in artifact.data else artifact.file(artifact.data["dir"])


def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    return gptqmodel.load_and_generate(checkpoint_path(ctx.inputs["artifact"]), step.params["prompt"],
                                       step.params["tokens"], ctx.log_path, ctx.out_dir,
                                       step.params["trust_remote_code"])


def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    tokens = ctx.inputs["tokens"]
    result = gptqmodel.evaluate(checkpoint_path(artifact), tokens.file(WINDOWS_FILE),
                                ctx.inputs["reference"].file(REFERENCE_FILE), tokens.file(SAMPLE_FILE),
                                ctx.log_path, ctx.out_dir, step.params["trust_remote_code"], progress=ctx.progress)
    source_has_template = ctx.inputs["source"].data.get("has_chat_template", False)
    result["chat_template_missing"] = bool(source_has_template and not result["chat_template"])
    return result
