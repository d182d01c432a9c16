"""GGUF through llama.cpp: convert once to a full-precision GGUF, quantize to each listed type, then verify each
file in the llama.cpp runtime before it may be published.

    source ─► gguf.convert ─► gguf.quantize[type] ─► gguf.verify[type] ─► gguf.evaluate[type] ─► gate ─► publish
    source ─► calibration ─► gguf.imatrix ─┘   (with `imatrix: true`; one matrix for every type)

verify: llama.cpp loads the file and greedily generates; evaluate: perplexity, KL divergence and top-1
agreement against the source model on the harness's windows, the GGUF's own tokenizer against the source's,
and the chat template; gate: the limits those must meet before the file may be published.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..calibrate import IMATRIX_FILE, imatrix_step
from ..config import GGUFTarget, ModelTarget
from ..errors import VerificationError
from ..evaluate import REFERENCE_FILE, SAMPLE_FILE, WINDOWS_FILE, EvalSteps, gate_step
from ..gguf_types import DEFAULT_MAX_PPL_INCREASE, IMATRIX_UNUSED
from ..plan import PlanContext, Step
from ..toolchains import llamacpp
from . import PlannedFormat

if TYPE_CHECKING:
    from ..engine import StepContext, StepOutput

INTERMEDIATE_FILE = "intermediate.gguf"
VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 8


def artifact_name(model: str, gguf_type: str) -> str:
    return f"{model}-{gguf_type}.gguf"


def plan(model: ModelTarget, target: GGUFTarget, source: Step, evaluation: EvalSteps,
         context: PlanContext, calibration: Callable[..., Step]) -> PlannedFormat:
    converter = context.memo("converter", lambda: llamacpp.converter_version(context.llama_cpp_dir))
    libllama = context.memo("libllama", llamacpp.llama_cpp_version)
    out = PlannedFormat()
    convert = Step(kind="gguf.convert", label=f"{model.name}/gguf:convert",
                   params={"outtype": target.intermediate}, inputs={"source": source},
                   tools={"converter": converter}, model=model.name, fmt="gguf")
    out.steps.append(convert)
    imatrix = None
    if target.imatrix and any(t not in IMATRIX_UNUSED for t in target.types):
        imatrix = imatrix_step(model, source, calibration())
        out.steps.append(imatrix)
    for gguf_type in target.types:
        quantize_inputs = {"intermediate": convert}
        if imatrix is not None and gguf_type not in IMATRIX_UNUSED:
            quantize_inputs["imatrix"] = imatrix
        quantize = Step(kind="gguf.quantize", label=f"{model.name}/gguf/{gguf_type}:quantize",
                        params={"type": gguf_type, "file": artifact_name(model.name, gguf_type)},
                        inputs=quantize_inputs, tools={"libllama": libllama},
                        model=model.name, fmt="gguf")
        verify = Step(kind="gguf.verify", label=f"{model.name}/gguf/{gguf_type}:verify",
                      params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS},
                      inputs={"artifact": quantize}, tools={"libllama": libllama},
                      model=model.name, fmt="gguf")
        evaluate = evaluate_step(f"{model.name}/gguf/{gguf_type}:evaluate", quantize, evaluation, source, context,
                                 model.name)
        gate = gate_step(f"{model.name}/gguf/{gguf_type}:gate", "gguf", gguf_type, evaluate, verify,
                         evaluation.settings, DEFAULT_MAX_PPL_INCREASE.get(gguf_type), context.enforce_gates,
                         model.name)
        out.steps += [quantize, verify, evaluate, gate]
        out.publishable[gguf_type] = (quantize, gate)
    return out


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  model: str = "") -> Step:
    """Score `artifact` in llama.cpp on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="gguf.evaluate", label=label, params={},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source},
                tools={"libllama": context.memo("libllama", llamacpp.llama_cpp_version)}, model=model, fmt="gguf")


def run_convert(step: Step, ctx: StepContext) -> dict[str, Any]:
    source = ctx.inputs["source"]
    converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
    out_file = ctx.out_dir / INTERMEDIATE_FILE
    llamacpp.convert(converter, Path(source.data["path"]), out_file, step.params["outtype"], ctx.log_path,
                     step.model)
    info = llamacpp.describe_gguf(out_file)
    info.pop("tensor_types")
    return {"converter": converter.version, **info}


def run_quantize(step: Step, ctx: StepContext) -> dict[str, Any]:
    intermediate = ctx.inputs["intermediate"].file(INTERMEDIATE_FILE)
    out_file = ctx.out_dir / step.params["file"]
    imatrix = None
    if "imatrix" in ctx.inputs:
        # HF module names become GGUF tensor names through the converter's own name map
        converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
        imatrix = (ctx.inputs["imatrix"].file(IMATRIX_FILE), converter.root / "gguf-py")
    result = llamacpp.quantize(intermediate, out_file, step.params["type"], ctx.log_path, ctx.options.threads,
                               imatrix=imatrix)
    info = llamacpp.describe_gguf(out_file)
    if result.get("imatrix"):
        result["imatrix"]["calibration"] = ctx.inputs["imatrix"].data.get("calibration")
    return {
        "imatrix": result.get("imatrix"),
        "type": step.params["type"],
        "file": out_file.name,
        "converter": ctx.inputs["intermediate"].data.get("converter"),
        "size": out_file.stat().st_size,
        "quantize_seconds": result["seconds"],
        # llama.cpp silently substitutes types for tensors whose rows do not fit a K-quant's 256-blocks
        "fallbacks": result["fallbacks"],
        **info,
    }


def artifact_path(artifact: StepOutput) -> Path:
    """A built artifact lives in its step folder; an external one (quantforge eval FILE) where it is."""
    return Path(artifact.data["path"]) if "path" in artifact.data else artifact.file(artifact.data["file"])


def external_step(path: Path, context: PlanContext) -> Step:
    """A GGUF made elsewhere, identified by its content, as the input of an ad-hoc evaluation."""
    from ..store import sha256_file

    digest = context.memo(f"file:{path}", lambda: sha256_file(path))
    return Step(kind="gguf.external", label=f"{path.name}:artifact", params={"path": str(path), "sha256": digest})


def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.params["path"])
    info = llamacpp.describe_gguf(path)
    info.pop("tensor_types")
    return {"file": path.name, "path": str(path), "size": path.stat().st_size, **info}


def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    gguf_file = artifact_path(artifact)
    result = llamacpp.load_and_generate(gguf_file, step.params["prompt"], step.params["tokens"], ctx.log_path,
                                        ctx.out_dir)
    if not result["generated_ids"]:
        raise VerificationError(f"{gguf_file.name}: llama.cpp generated no token")
    return {k: v for k, v in result.items() if k != "ok"}


def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    tokens = ctx.inputs["tokens"]
    gguf_file = artifact_path(artifact)
    result = llamacpp.evaluate(gguf_file, tokens.file(WINDOWS_FILE), ctx.inputs["reference"].file(REFERENCE_FILE),
                               tokens.file(SAMPLE_FILE), ctx.log_path, ctx.out_dir, ctx.options.threads)
    source_has_template = ctx.inputs["source"].data.get("has_chat_template", False)
    result["chat_template"] = artifact.data.get("has_chat_template", False)
    result["chat_template_missing"] = bool(source_has_template and not result["chat_template"])
    return result
