"""One evaluation harness for every format: token windows cut once with the source's tokenizer, the source
model's reference distribution computed once in torch, each artifact scored on the same ids by its own runtime,
and quality gates that decide whether an artifact may be published.

    source ─► eval.tokens ─► eval.reference ─┐
    artifact ─────────────────────────────────┴► <format>.evaluate ─► gate ─► publish
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import metrics
from .config import EvaluationSettings, ModelTarget, Targets
from .data import cut_windows, load_text, parse_text_source, resolve_paths, text_identity
from .errors import QuantforgeError
from .plan import PlanContext, Step

if TYPE_CHECKING:
    from .engine import StepContext

log = logging.getLogger(__name__)

WINDOWS_FILE = "windows.npy"
SAMPLE_FILE = "tokenizer_sample.json"
REFERENCE_FILE = "reference.npz"
# Appended to the tokenizer-parity sample: non-ASCII, digits and code, where tokenizers most often diverge.
TOKENIZER_PROBE = "naïve café — Größe 東京 2024: x += 1  # déjà vu\n\tindent"
SAMPLE_CHARS = 2000


class GateFailed(QuantforgeError):
    """An artifact's measured quality is outside its gate: it must not be published."""


@dataclass(frozen=True)
class EvalSteps:
    tokens: Step
    reference: Step
    settings: EvaluationSettings


def plan_evaluation(model: ModelTarget, targets: Targets, source: Step, context: PlanContext) -> EvalSteps:
    settings = model.evaluation
    spec, digest = text_identity(settings.dataset, targets.base_dir, context.memo)
    tokens = Step("eval.tokens", f"{model.name}:eval-tokens",
                  params={"dataset": spec, "text_sha256": digest, "ctx": settings.ctx, "chunks": settings.chunks},
                  inputs={"source": source}, model=model.name)
    # the dtype is chosen at run time (bf16 on a GPU, fp32 on a CPU) and recorded, not keyed: either is a fine
    # reference, and importing torch to decide would cost every `plan` a second
    reference = Step("eval.reference", f"{model.name}:eval-reference",
                     params={"top_k": metrics.TOP_K},
                     inputs={"source": source, "tokens": tokens}, model=model.name)
    return EvalSteps(tokens, reference, settings)


def gate_step(label: str, fmt: str, qtype: str | None, evaluation: Step, check: Step, settings: EvaluationSettings,
              default_ppl: float | None, enforce: bool, model: str) -> Step:
    params = {
        "max_ppl_increase": settings.gate("max_ppl_increase", fmt, qtype, default_ppl),
        "max_kld": settings.gate("max_kld", fmt, qtype, None),
        "tokenizer_check": settings.tokenizer_check,
        "enforce": enforce,
        "gate_name": f"{fmt}/{qtype}" if qtype else fmt,
    }
    return Step("gate", label, params=params, inputs={"evaluation": evaluation, "check": check}, model=model,
                fmt=fmt)


def reference_dtype() -> str:
    """The source model runs in bf16 on a GPU, in fp32 on a CPU."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


# ------------------------------------------------------------------------------------------------ runners

def run_tokens(step: Step, ctx: StepContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    source_dir = ctx.inputs["source"].data["path"]
    text = load_text(resolve_paths(parse_text_source(step.params["dataset"]), Path("/")))
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = cut_windows(ids, step.params["ctx"], step.params["chunks"], tokenizer.bos_token_id)
    np.save(ctx.out_dir / WINDOWS_FILE, windows)
    sample = text[:SAMPLE_CHARS] + "\n" + TOKENIZER_PROBE
    sample_ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    (ctx.out_dir / SAMPLE_FILE).write_text(json.dumps({"text": sample, "ids": sample_ids}, ensure_ascii=False))
    return {"text_tokens": len(ids), "windows": int(windows.shape[0]), "ctx": int(windows.shape[1]),
            "bos_id": tokenizer.bos_token_id}


def run_reference(step: Step, ctx: StepContext) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the console shows our progress; this one would interleave with it
    source = ctx.inputs["source"]
    windows = np.load(ctx.inputs["tokens"].file(WINDOWS_FILE))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = reference_dtype()
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source.data["path"], dtype=dtype).to(device).eval()
    load_seconds = time.perf_counter() - started
    parts = []
    started = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            logits = model(torch.from_numpy(window[None, :].astype(np.int64)).to(device)).logits[0]
            parts.append(metrics.score_window(logits.float().cpu().numpy(), window, step.params["top_k"]))
    seconds = time.perf_counter() - started
    del model
    reference = metrics.concat(parts)
    reference.save(ctx.out_dir / REFERENCE_FILE)
    ppl, err = metrics.perplexity(reference.nll)
    return {"ppl": round(ppl, 4), "ppl_err": round(err, 4), "tokens_scored": len(reference.nll),
            "device": device, "dtype": dtype_name, "load_seconds": round(load_seconds, 2),
            "tokens_per_second": round(windows.size / seconds, 1)}


def run_gate(step: Step, ctx: StepContext) -> dict[str, Any]:
    """Compare an artifact's measurements with its limits; raise GateFailed naming every gate it misses."""
    result = ctx.inputs["evaluation"].data
    p = step.params
    problems = []
    if p["max_ppl_increase"] is not None and result["delta_ppl"] > p["max_ppl_increase"]:
        problems.append(f"ΔPPL {result['delta_ppl']:+.2%} exceeds max_ppl_increase {p['max_ppl_increase']:.2%} "
                        f"(PPL {result['ppl']:.3f} vs source {result['source_ppl']:.3f})")
    if p["max_kld"] is not None and result["kld_mean"] > p["max_kld"]:
        problems.append(f"KLD {result['kld_mean']:.4f} exceeds max_kld {p['max_kld']:.4f}")
    parity = result.get("tokenizer")
    if p["tokenizer_check"] and parity and not parity["same"]:
        problems.append(f"tokenizer differs from the source's: {parity['first_difference']}")
    if result.get("chat_template_missing"):
        problems.append("the source has a chat template but the artifact does not embed it")
    if problems and p["enforce"]:
        raise GateFailed(f"gate {p['gate_name']} failed: " + "; ".join(problems))
    gate = {"name": p["gate_name"], "passed": not problems, "enforced": p["enforce"], "problems": problems,
            "max_ppl_increase": p["max_ppl_increase"], "max_kld": p["max_kld"]}
    return {**result, "sample": ctx.inputs["check"].data.get("generated_text"), "gate": gate}


def plan_adhoc(artifact: Path, source: str, revision: str, settings: EvaluationSettings,
               context: PlanContext, max_ppl_increase: float | None, max_kld: float | None):
    """`quantforge eval`: score a GGUF file or a GPTQ/AWQ checkpoint folder made elsewhere against a source
    model, through the same steps (and the same cache) as a build."""
    from .config import Formats, GGUFTarget
    from .errors import BadInputError
    from .formats import checkpoint, gguf
    from .plan import Plan, topological
    from .sources import source_step

    targets = Targets(path=Path.cwd() / "<quantforge eval>", models=())
    model = ModelTarget(name="eval", source=source, revision=revision, formats=Formats(gguf=GGUFTarget()),
                        evaluation=settings)
    if artifact.is_file() and artifact.suffix == ".gguf":
        fmt, artifact_step = "gguf", gguf.external_step(artifact.resolve(), context)
    elif artifact.is_dir():
        artifact_step, fmt = checkpoint.external_step(artifact.resolve(), context)
    else:
        raise BadInputError(f"{artifact}: expected a .gguf file or a GPTQ/AWQ checkpoint folder")
    src = source_step(model, targets, context)
    evaluation = plan_evaluation(model, targets, src, context)
    label = f"{artifact.name}:evaluate"
    evaluate = (gguf.evaluate_step(label, artifact_step, evaluation, src, context) if fmt == "gguf"
                else checkpoint.evaluate_step(label, artifact_step, evaluation, src, context, fmt))
    limits = settings.model_copy(update={"max_ppl_increase": {fmt: max_ppl_increase} if max_ppl_increase
                                         is not None else {}, "max_kld": {fmt: max_kld} if max_kld
                                         is not None else {}})
    gate = gate_step(f"{artifact.name}:gate", fmt, None, evaluate, artifact_step, limits, None, True, "eval")
    return Plan(targets, topological([gate]))
