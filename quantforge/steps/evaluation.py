"""One evaluation harness for every format: token windows cut once with the source's tokenizer, the source
model's reference distribution computed once in torch, each artifact scored on the same ids by its own runtime,
and quality gates that decide whether an artifact may be published.

    source ─► eval.tokens ─► eval.reference ─┐
    artifact ─────────────────────────────────┴► <format>.evaluate ─► gate ─► publish

This module owns the windows and the reference; formats own their artifact's evaluate step (its runtime),
steps/gate.py the limits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..config.schema import ModelTarget, Targets
from ..core.formats import EvalSteps
from ..core.registry import Estimates, step_kind
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..data import TextSource, cut_windows, load_text, parse_text_source, resolve_paths, text_identity
from ..toolchains import tokenizer_worker, torch_worker
from .memory import torch_pass_memory
from .rates import torch_pass_seconds

log = logging.getLogger(__name__)

WINDOWS_FILE = "windows.npy"
SAMPLE_FILE = "tokenizer_sample.json"
REFERENCE_FILE = "reference.npz"
# Appended to the tokenizer-parity sample: non-ASCII, digits and code, where tokenizers most often diverge.
TOKENIZER_PROBE = "naïve café — Größe 東京 2024: x += 1  # déjà vu\n\tindent"
SAMPLE_CHARS = 2000
# What every artifact is asked to continue when its real consumer loads it (verification)
VERIFY_PROMPT = "The capital of France is"
VERIFY_TOKENS = 8


@dataclass(frozen=True)
class ScoringInputs:
    """What every format's evaluate step reads, by attribute: the windows (their number and length), the source's
    reference distribution on them, the tokenizer-parity sample, and whether the source has a chat template."""

    windows: Path
    reference: Path
    sample: Path
    count: int
    ctx: int
    source_has_chat_template: bool

    @classmethod
    def of(cls, inputs: Mapping[str, StepOutput]) -> ScoringInputs:
        """From an evaluate step's inputs: `tokens`, `reference` and `source` (evaluate_step of each format)."""
        tokens = inputs["tokens"]
        return cls(tokens.file(WINDOWS_FILE), inputs["reference"].file(REFERENCE_FILE), tokens.file(SAMPLE_FILE),
                   int(tokens.data["windows"]), int(tokens.data["ctx"]),
                   bool(inputs["source"].data.get("has_chat_template", False)))

    def chat_template_missing(self, artifact_has_one: bool) -> bool:
        """The source has a chat template and the artifact lost it: a chat client would fall back to plain text."""
        return self.source_has_chat_template and not artifact_has_one


def plan_evaluation(model: ModelTarget, targets: Targets, source: Step, context: PlanContext) -> EvalSteps:
    settings = model.evaluation
    text = text_identity(settings.dataset, targets.base_dir, context.memo)
    tokens = Step("eval.tokens", f"{model.name}:eval-tokens",
                  params={"dataset": text.spec, "text_sha256": text.digest, "ctx": settings.ctx,
                          "chunks": settings.chunks},
                  inputs={"source": source}, model=model.name, local={"dataset": text.local})
    # the dtype is chosen at run time (bf16 on a GPU, fp32 on a CPU) and recorded, not keyed: either is a fine
    # reference, and importing torch to decide would cost every `plan` a second
    reference = Step("eval.reference", f"{model.name}:eval-reference",
                     params={"top_k": metrics.TOP_K},
                     inputs={"source": source, "tokens": tokens}, model=model.name)
    return EvalSteps(tokens, reference, settings)


# ------------------------------------------------------------------------------------------------ runners

def local_text_source(step: Step) -> TextSource:
    """The text a step reads, with this machine's absolute paths (Step.local; the key holds them as written)."""
    return resolve_paths(parse_text_source(step.local.get("dataset", step.params["dataset"])), Path("/"))


# 2: windows start with BOS only when the tokenizer adds one (as llama.cpp's perplexity does)
@step_kind("eval.tokens", version="2")
def run_tokens(step: Step, ctx: StepContext) -> dict[str, Any]:
    source_dir = Path(ctx.inputs["source"].data["path"])
    text = load_text(local_text_source(step))
    sample = text[:SAMPLE_CHARS] + "\n" + TOKENIZER_PROBE
    tokenized = tokenizer_worker.tokenize(source_dir, [text, sample], ctx.out_dir, ctx.log_path)
    ids, sample_ids = tokenized.ids
    windows = cut_windows(ids, step.params["ctx"], step.params["chunks"], tokenized.window_bos)
    np.save(ctx.out_dir / WINDOWS_FILE, windows)
    (ctx.out_dir / SAMPLE_FILE).write_text(json.dumps({"text": sample, "ids": sample_ids}, ensure_ascii=False))
    return {"text_tokens": len(ids), "windows": int(windows.shape[0]), "ctx": int(windows.shape[1]),
            "bos_id": tokenized.bos_id, "adds_bos": tokenized.adds_bos}



@step_kind("eval.reference", version="1",
           estimates=Estimates(memory=torch_pass_memory, seconds=torch_pass_seconds))
def run_reference(step: Step, ctx: StepContext) -> dict[str, Any]:
    # in a child process: a big model's out-of-memory kill fails this step only, torch's warnings go to its log,
    # and the child streams the model layer by layer when it would not fit whole (the figures are the same)
    return torch_worker.reference(Path(ctx.inputs["source"].data["path"]), ctx.inputs["tokens"].file(WINDOWS_FILE),
                                  ctx.out_dir / REFERENCE_FILE, step.params["top_k"], ctx.log_path,
                                  label=step.label, progress=ctx.progress)
