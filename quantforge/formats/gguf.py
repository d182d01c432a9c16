"""GGUF through llama.cpp: convert once to a full-precision GGUF, quantize to each listed type, then verify each
file in the llama.cpp runtime before it may be published.

    source ─► gguf.convert ─► gguf.quantize[type] ─► gguf.verify[type] ─► gguf.evaluate[type] ─► gate ─► publish
    source ─► calibration ─► gguf.imatrix ─┘   (with `imatrix: true`; one matrix for every type)
                                        └──► gguf.imatrix_file ────────────────────────────────────────► publish

verify: llama.cpp loads the file and greedily generates; evaluate: perplexity, KL divergence and top-1
agreement against the source model on the harness's windows, the GGUF's own tokenizer against the source's,
and the chat template; gate: the limits those must meet before the file may be published.

A variant (Q4_K_L, or one declared under `variants`: gguf_recipes.py) is quantized from its base type with its
recipe in the step's parameters, and its gate (gguf.variant_gate, gguf_frontier.py) also reads every stock type's
size and mean KLD: it must beat the stock frontier at its size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..card import public_text_name, release_info
from ..config.schema import ModelTarget
from ..core.formats import (
    AdhocArtifact,
    CardInputs,
    EvalSteps,
    PlannedFormat,
    Publishable,
    PublishedArtifact,
    RepoFile,
    register_format,
)
from ..core.registry import step_kind
from ..core.staleness import moved
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..errors import BadInputError, ToolchainError, VerificationError
from ..gguf_types import DEFAULT_MAX_PPL_INCREASE_BY_TYPE
from ..steps.evaluation import VERIFY_PROMPT, VERIFY_TOKENS, ScoringInputs
from ..steps.gate import gate_step
from ..store import sha256_file
from ..toolchains import imatrix_gguf, llamacpp
from ..toolchains.gguf_split import split_gguf
from . import gguf_allocation, gguf_costs, gguf_recipes, gguf_release
from .gguf_card import CARD_TEMPLATE, render_gguf_card
from .gguf_frontier import variant_gate
from .gguf_imatrix import IMATRIX_FILE, imatrix_step
from .gguf_recipes import Recipe
from .gguf_release import IMATRIX_FILE_KIND, INTERMEDIATE_FILE, imatrix_file_name
from .gguf_search import sensitivity_step
from .gguf_settings import GGUFSettings

__all__ = ["CARD_TEMPLATE", "FORMAT", "GGUFSettings", "artifact_name", "plan", "render_gguf_card"]


def artifact_name(model: str, gguf_type: str) -> str:
    return f"{model}-{gguf_type}.gguf"


def plan(model: ModelTarget, target: GGUFSettings, source: Step, evaluation: EvalSteps,
         context: PlanContext, calibration: Callable[..., Step]) -> PlannedFormat:
    converter = context.memo("converter", lambda: llamacpp.converter_version(context.llama_cpp_dir))
    libllama = context.memo("libllama", llamacpp.llama_cpp_version)
    out = PlannedFormat()
    release = release_info(model)
    convert = Step(kind="gguf.convert", label=f"{model.name}/gguf:convert",
                   params={"outtype": target.intermediate,
                           "metadata": gguf_release.convert_metadata(model, release)},
                   inputs={"source": source}, tools={"converter": converter}, model=model.name, fmt="gguf")
    out.steps.append(convert)
    imatrix: Step | None = None
    matrix_kv: tuple[str, str, int] | None = None  # what quantize.imatrix.* say: file, dataset, chunks
    if target.imatrix and any(target.weighted(t) for t in target.names()):
        calib = calibration()
        imatrix = imatrix_step(model, source, calib)
        # the matrix as llama.cpp's tools write it, published beside the files and named inside each of them
        dataset = public_text_name(calib.params["dataset"])
        matrix_file = Step(kind=IMATRIX_FILE_KIND, label=f"{model.name}/gguf:imatrix-file",
                           params={"file": imatrix_file_name(model.name), "dataset": dataset},
                           inputs={"imatrix": imatrix, "intermediate": convert}, tools={"converter": converter},
                           model=model.name, fmt="gguf")
        matrix_kv = (matrix_file.params["file"], dataset, calib.params["samples"])
        out.steps += [imatrix, matrix_file]
        out.extras.append(matrix_file)
    sensitivity: Step | None = None  # one per model, for every searched variant (gguf_search.py)
    if any(target.budget(t) for t in target.names()):
        sensitivity = sensitivity_step(model, convert, calibration(), imatrix, libllama)
        out.steps.append(sensitivity)
    made: dict[str, tuple[Step, Step, Step]] = {}  # type -> quantize, verify, evaluate
    for gguf_type in target.names():
        quantize_inputs = {"intermediate": convert}
        weighted = imatrix is not None and target.weighted(gguf_type)
        if weighted:
            quantize_inputs["imatrix"] = imatrix
        metadata = gguf_release.quantize_metadata(model, release, source, matrix_kv if weighted else None)
        params: dict[str, Any] = {"type": gguf_type, "file": artifact_name(model.name, gguf_type), "metadata": metadata}
        recipe, budget = target.recipe(gguf_type), target.budget(gguf_type)
        if budget is not None and sensitivity is not None:  # the rules come from the search, at run time
            params = {**params, "type": recipe.base if recipe else gguf_type, "budget": budget.to_params(),
                      "variant": gguf_type}
            quantize_inputs["sensitivity"] = sensitivity
        elif recipe is not None:  # a stock type's parameters (and key) stay as they were
            params = {**params, "type": recipe.base, "recipe": recipe.to_params(),
                      "metadata": {**metadata, **recipe.metadata()}}
        quantize = Step(kind="gguf.quantize", label=f"{model.name}/gguf/{gguf_type}:quantize", params=params,
                        inputs=quantize_inputs, tools={"libllama": libllama},
                        model=model.name, fmt="gguf", qtype=gguf_type)
        verify = Step(kind="gguf.verify", label=f"{model.name}/gguf/{gguf_type}:verify",
                      params={"prompt": VERIFY_PROMPT, "tokens": VERIFY_TOKENS},
                      inputs={"artifact": quantize}, tools={"libllama": libllama},
                      model=model.name, fmt="gguf", qtype=gguf_type)
        evaluate = evaluate_step(f"{model.name}/gguf/{gguf_type}:evaluate", quantize, evaluation, source, context,
                                 model.name, gguf_type)
        made[gguf_type] = (quantize, verify, evaluate)
    stock = {t: (q, e) for t, (q, _, e) in made.items() if target.recipe(t) is None}
    for gguf_type, (quantize, verify, evaluate) in made.items():
        label = f"{model.name}/gguf/{gguf_type}:gate"
        recipe = target.recipe(gguf_type)
        if recipe is None:
            gate = gate_step(label, "gguf", gguf_type, evaluate, verify, evaluation.settings,
                             DEFAULT_MAX_PPL_INCREASE_BY_TYPE.get(gguf_type), context.enforce_gates, model.name)
        else:  # published only if it beats the stock files of this build at its size (gguf_frontier.py)
            gate = variant_gate(label, gguf_type, recipe.base, evaluate, verify, quantize, stock, evaluation.settings,
                                DEFAULT_MAX_PPL_INCREASE_BY_TYPE.get(recipe.base), context.enforce_gates, model.name)
        out.steps += [quantize, verify, evaluate, gate]
        out.publishable.append(Publishable(gguf_type, quantize, gate))
    return out


def evaluate_step(label: str, artifact: Step, evaluation: EvalSteps, source: Step, context: PlanContext,
                  model: str = "", qtype: str | None = None) -> Step:
    """Score `artifact` in llama.cpp on the model's evaluation windows (builds and `quantforge eval` alike)."""
    return Step(kind="gguf.evaluate", label=label, params={},
                inputs={"artifact": artifact, "tokens": evaluation.tokens, "reference": evaluation.reference,
                        "source": source},
                tools={"libllama": context.memo("libllama", llamacpp.llama_cpp_version)}, model=model, fmt="gguf",
                qtype=qtype)


# the F16 intermediate: read only by this build
@step_kind("gguf.convert", version="2", evict=True, estimates=gguf_costs.CONVERT)
def run_convert(step: Step, ctx: StepContext) -> dict[str, Any]:
    source = ctx.inputs["source"]
    converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
    out_file = ctx.out_dir / INTERMEDIATE_FILE
    llamacpp.convert(converter, Path(source.data["path"]), out_file, step.params["outtype"], ctx.log_path,
                     step.model, metadata=step.params["metadata"])
    info = llamacpp.describe_gguf(out_file)
    info.pop("tensor_types")
    return {"converter": converter.version, **info}


@step_kind("gguf.quantize", version="2", stage="artifact", estimates=gguf_costs.QUANTIZE)
def run_quantize(step: Step, ctx: StepContext) -> dict[str, Any]:
    intermediate = ctx.inputs["intermediate"].file(INTERMEDIATE_FILE)
    out_file = ctx.out_dir / step.params["file"]
    imatrix = None
    if "imatrix" in ctx.inputs:
        # HF module names become GGUF tensor names through the converter's own name map
        converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
        imatrix = (ctx.inputs["imatrix"].file(IMATRIX_FILE), converter.root / "gguf-py")
    metadata = gguf_release.build_metadata(step.params["metadata"], step.tools["libllama"],
                                           ctx.inputs["intermediate"].data.get("converter"))
    recipe = Recipe.from_params(step.params["recipe"]) if "recipe" in step.params else None
    search = None
    if "budget" in step.params:  # a searched variant: the rules that fit its budget best (gguf_allocation.py)
        recipe, search = gguf_allocation.search(step.params["variant"], step.params["type"],
                                                ctx.inputs["sensitivity"].data, step.params["budget"])
        metadata = {**metadata, **recipe.metadata()}
    tensors = gguf_recipes.quantized_tensors(intermediate) if recipe else []
    if recipe is not None:  # before quantizing: a pattern that fits no tensor of this model is the user's to fix
        gguf_recipes.check_tensors(recipe, tensors, f"{step.model}: formats.gguf.variants.{recipe.name}")
    result = llamacpp.quantize(intermediate, out_file, step.params["type"], ctx.log_path, ctx.options.threads,
                               imatrix=imatrix, kv_overrides=metadata,
                               tensor_types=recipe.tensor_types() if recipe else None)
    info = llamacpp.describe_gguf(out_file)
    if result.get("imatrix"):
        result["imatrix"]["calibration"] = ctx.inputs["imatrix"].data.get("calibration")
    if recipe is not None:  # what each rule set, read back from the file
        result["recipe"] = gguf_recipes.applied(recipe, tensors, info["tensor_types"], result["fallbacks"])
    if search is not None:
        size = out_file.stat().st_size
        if size > search["limit_bytes"]:  # the allocation counts every byte: a miss is a bug, never published
            raise ToolchainError(f"{out_file.name}: the searched mix takes {size} bytes, over its budget of "
                                 f"{search['limit_bytes']}")
        result["recipe"]["search"] = search
    return {
        **({"recipe": result["recipe"]} if recipe else {}),
        "imatrix": result.get("imatrix"),
        "type": step.params["type"],
        "file": out_file.name,
        "converter": ctx.inputs["intermediate"].data.get("converter"),
        "size": out_file.stat().st_size,
        "quantize_seconds": result["seconds"],
        "peak_rss_bytes": result.get("peak_rss_bytes"),  # the worker's process tree (toolchains/worker.py)
        # llama.cpp silently substitutes types for tensors whose rows do not fit a K-quant's 256-blocks
        "fallbacks": result["fallbacks"],
        "metadata": result.get("kv_overrides"),  # the provenance keys written into the file
        **info,
    }


@step_kind(IMATRIX_FILE_KIND, version="1", stage="extra")
def run_imatrix_file(step: Step, ctx: StepContext) -> dict[str, Any]:
    """The importance matrix in llama.cpp's imatrix GGUF format, under the converted model's tensor names."""
    matrix = ctx.inputs["imatrix"]
    calibration = matrix.data["calibration"]
    converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
    out_file = ctx.out_dir / step.params["file"]
    result = imatrix_gguf.export(matrix.file(IMATRIX_FILE), ctx.inputs["intermediate"].file(INTERMEDIATE_FILE),
                                 out_file, converter.root / "gguf-py", ctx.log_path, tokens=matrix.data["tokens"],
                                 chunk_size=calibration["seq_len"], chunk_count=calibration["samples"],
                                 datasets=[step.params["dataset"]])
    return {"file": out_file.name, "entries": result["entries"], "unmapped": result["unmapped"],
            "chunks": calibration["samples"], "chunk_size": calibration["seq_len"], "tokens": matrix.data["tokens"],
            "dataset": step.params["dataset"], "size": out_file.stat().st_size}


def artifact_path(artifact: StepOutput) -> Path:
    """A built artifact lives in its step folder; an external one (quantforge eval FILE) where it is."""
    if artifact.manifest.get("kind") == "gguf.external":
        return Path(artifact.data["path"])
    return artifact.file(artifact.data["file"])


def adhoc(path: Path, source: Step, evaluation: EvalSteps, context: PlanContext) -> AdhocArtifact | None:
    """`quantforge eval FILE.gguf`: a GGUF made elsewhere, identified by its content."""
    if not (path.is_file() and path.suffix == ".gguf"):
        return None
    from ..toolchains.gguf_header import read_header

    try:  # a damaged file is refused here, in a second, before the source model is read
        read_header(path)
        digest = context.memo(f"file:{path}", lambda: sha256_file(path))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)) from None
    # keyed by content alone: the same file evaluated from another folder or machine is the same artifact
    artifact = Step(kind="gguf.external", label=f"{path.name}:artifact", params={"sha256": digest},
                    local={"path": str(path)})
    return AdhocArtifact("gguf", artifact, evaluate_step(f"{path.name}:evaluate", artifact, evaluation, source,
                                                         context))


@step_kind("gguf.external", version="2", stage="artifact", check=moved)
def run_external(step: Step, ctx: StepContext) -> dict[str, Any]:
    path = Path(step.local["path"])
    info = llamacpp.describe_gguf(path)
    info.pop("tensor_types")
    return {"file": path.name, "path": str(path), "size": path.stat().st_size, **info}


# 2: an EOS is not a generated token
@step_kind("gguf.verify", version="2", stage="verify", estimates=gguf_costs.VERIFY)
def run_verify(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    gguf_file = artifact_path(artifact)
    result = llamacpp.load_and_generate(gguf_file, step.params["prompt"], step.params["tokens"], ctx.log_path,
                                        ctx.out_dir, ctx.options.threads)
    if not result["generated_ids"]:
        raise VerificationError(f"{gguf_file.name}: llama.cpp generated no token (its first choice was "
                                f"end-of-sequence) after {step.params['prompt']!r}")
    return {k: v for k, v in result.items() if k != "ok"}


@step_kind("gguf.evaluate", version="1", stage="evaluate", estimates=gguf_costs.EVALUATE)
def run_evaluate(step: Step, ctx: StepContext) -> dict[str, Any]:
    artifact = ctx.inputs["artifact"]
    scoring = ScoringInputs.of(ctx.inputs)
    result = llamacpp.evaluate(artifact_path(artifact), scoring.windows, scoring.reference, scoring.sample,
                               ctx.log_path, ctx.out_dir, ctx.options.threads)
    result["chat_template"] = artifact.data.get("has_chat_template", False)
    result["chat_template_missing"] = scoring.chat_template_missing(result["chat_template"])
    return result


# ------------------------------------------------------------------------------------------------ publishing

def published_files(output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact:
    """The GGUF file, or llama.cpp split shards of it when it is over the size limit."""
    file = output.data["file"]
    meta = output.files()[file]
    if meta["size"] <= max_file_size:
        return PublishedArtifact({file: (output.file(file), meta["sha256"])}, sha256=meta["sha256"])
    parts = split_gguf(output.file(file), scratch, max_file_size)
    return PublishedArtifact({p.name: (p, sha256_file(p)) for p in parts}, sha256=meta["sha256"],
                             shards=tuple(p.name for p in parts))


class GGUF:
    name = "gguf"
    settings = GGUFSettings
    card_template = CARD_TEMPLATE
    key_tools = (llamacpp.PACKAGE,)
    plan = staticmethod(plan)
    adhoc = staticmethod(adhoc)

    @staticmethod
    def published_files(output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact:
        return published_files(output, scratch, max_file_size)

    @staticmethod
    def render_card(card: CardInputs) -> str:
        return render_gguf_card(repo_id=card.repo_id, model=card.model, namespace=card.namespace,
                                source=card.source, tokens=card.tokens,
                                artifacts={a.name: (a.output, a.gate) for a in card.artifacts},
                                shards={a.name: list(a.shards) for a in card.artifacts if a.shards},
                                release=card.release, extras=card.extras, removed=card.removed)

    @staticmethod
    def repo_files(card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
        return gguf_release.repo_files(card, scratch)


FORMAT = register_format(GGUF())
