"""GGUF through llama.cpp: convert once to a full-precision GGUF, quantize to each listed type, then verify each
file in the llama.cpp runtime before it may be published.

    source ─► gguf.convert ─► gguf.quantize[type] ─► gguf.verify[type] ─► publish
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import GGUFTarget, ModelTarget
from ..errors import VerificationError
from ..plan import PlanContext, Step
from ..toolchains import llamacpp
from . import PlannedFormat

if TYPE_CHECKING:
    from ..engine import StepContext

INTERMEDIATE_FILE = "intermediate.gguf"
VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 8


def artifact_name(model: str, gguf_type: str) -> str:
    return f"{model}-{gguf_type}.gguf"


def plan(model: ModelTarget, target: GGUFTarget, source: Step, context: PlanContext) -> PlannedFormat:
    converter = context.memo("converter", lambda: llamacpp.converter_version(context.llama_cpp_dir))
    libllama = context.memo("libllama", llamacpp.llama_cpp_version)
    out = PlannedFormat()
    convert = Step(kind="gguf.convert", label=f"{model.name}/gguf:convert",
                   params={"outtype": target.intermediate}, inputs={"source": source},
                   tools={"converter": converter}, model=model.name, fmt="gguf")
    out.steps.append(convert)
    for gguf_type in target.types:
        quantize = Step(kind="gguf.quantize", label=f"{model.name}/gguf/{gguf_type}:quantize",
                        params={"type": gguf_type, "file": artifact_name(model.name, gguf_type)},
                        inputs={"intermediate": convert}, tools={"libllama": libllama},
                        model=model.name, fmt="gguf")
        verify = Step(kind="gguf.verify", label=f"{model.name}/gguf/{gguf_type}:verify",
                      params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS},
                      inputs={"artifact": quantize}, tools={"libllama": libllama},
                      model=model.name, fmt="gguf")
        out.steps += [quantize, verify]
        out.publishable[gguf_type] = (quantize, verify)
    return out


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
    result = llamacpp.quantize(intermediate, out_file, step.params["type"], ctx.log_path, ctx.options.threads)
    info = llamacpp.describe_gguf(out_file)
    return {
        "type": step.params["type"],
        "file": out_file.name,
        "size": out_file.stat().st_size,
        "quantize_seconds": result["seconds"],
        # llama.cpp silently substitutes types for tensors whose rows do not fit a K-quant's 256-blocks
        "fallbacks": result["fallbacks"],
        **info,
    }


def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    gguf_file = artifact.file(artifact.data["file"])
    result = llamacpp.load_and_generate(gguf_file, step.params["prompt"], step.params["tokens"], ctx.log_path)
    if not result["generated_ids"]:
        raise VerificationError(f"{gguf_file.name}: llama.cpp generated no token")
    return {k: v for k, v in result.items() if k != "ok"}
