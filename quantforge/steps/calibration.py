"""Calibration: token windows cut once per (source, text, samples, seq_len) and shared by every format that
calibrates (an importance matrix, a GPTQModel method): a format asks for its windows through the `calibration`
callable the assembler hands it, and formats asking for the same text share one step.

    source ─► calibration ─┬► <format>'s calibrated step
                           └► <another format>'s
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import ModelTarget, Targets
from ..core.registry import step_kind
from ..core.step import PlanContext, Step, StepContext, StepOutput
from ..data import cut_calibration, load_text, text_digest, text_identity
from ..text_mix import MIX_NAME, build_mix, makeup
from ..toolchains import tokenizer_worker
from .evaluation import local_text_source

CALIBRATION_FILE = "calibration.npy"


def calibration_step(model: ModelTarget, targets: Targets, source: Step, context: PlanContext, *,
                     dataset: str | None = None, samples: int | None = None, seq_len: int | None = None) -> Step:
    """The calibration windows for `model`; formats that ask for the same text share one step."""
    default = model.calibration
    dataset = dataset or default.dataset
    samples = samples or default.samples
    seq_len = seq_len or default.seq_len
    text = text_identity(dataset, targets.base_dir, context.memo)
    label = f"{model.name}:calibration"
    if (dataset, samples, seq_len) != (default.dataset, default.samples, default.seq_len):
        label += f"-{samples}x{seq_len}"
        if dataset != default.dataset:
            label += "-" + hashlib.sha256(text.spec.encode()).hexdigest()[:8]
    local: dict[str, Any] = {"dataset": text.local}
    evaluation = model.evaluation
    if text_identity(evaluation.dataset, targets.base_dir, context.memo) == text:
        # one text for both: the run refuses windows that would reach into the evaluation's (a check, not an input:
        # unkeyed, so that changing the evaluation does not calibrate again)
        local["evaluation_tokens"] = evaluation.ctx * evaluation.chunks
    return context.memo(f"step:{label}", lambda: Step(
        "calibration", label, params={"dataset": text.spec, "text_sha256": text.digest, "samples": samples,
                                      "seq_len": seq_len},
        inputs={"source": source}, model=model.name, local=local))


# ------------------------------------------------------------------------------------------------ runners

# 2: BOS only when the tokenizer adds one; 3: the text's make-up and sha256 recorded, builtin:mix tokenized by block
@step_kind("calibration", version="3")
def run_calibration(step: Step, ctx: StepContext) -> dict[str, Any]:
    source = local_text_source(step)
    source_dir = Path(ctx.inputs["source"].data["path"])
    mix = build_mix() if source.kind == "builtin" and source.name == MIX_NAME else None
    rendered, how = None, ""
    if mix is not None:  # its chat turns as this model is prompted
        rendered, how = tokenizer_worker.render_chats(source_dir, mix.conversations(), ctx.out_dir, ctx.log_path)
    texts = mix.texts(rendered) if mix is not None else [load_text(source)]
    # the mix block by block: no token straddles two parts, so each part's tokens can be counted
    tokenized = tokenizer_worker.tokenize(source_dir, texts, ctx.out_dir, ctx.log_path)
    ids = [i for block in tokenized.ids for i in block]
    windows, first = cut_calibration(ids, step.params["seq_len"], step.params["samples"], tokenized.window_bos,
                                     after=step.local.get("evaluation_tokens", 0))
    text = "".join(texts)
    record: dict[str, Any] = {"sha256": text_digest(text), "characters": len(text), "tokens": len(ids)}
    if mix is not None:
        ends = np.cumsum([len(block) for block in tokenized.ids])
        in_windows = [int(end - max(end - len(block), first)) if end > first else 0
                      for block, end in zip(tokenized.ids, ends, strict=True)]
        record |= {"chat": how, "parts": makeup(mix, [len(b) for b in tokenized.ids], in_windows, rendered)}
    np.save(ctx.out_dir / CALIBRATION_FILE, windows)
    return {"text_tokens": len(ids), "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "first_token": first, "bos_id": tokenized.bos_id, "adds_bos": tokenized.adds_bos, "text": record}


def calibration_settings(calibration: StepOutput) -> dict[str, Any]:
    """The text, samples and window length a calibration step used, as cards and manifests describe them; with
    the text's sha256 and (builtin:mix) its make-up, where the step recorded them."""
    settings = {k: calibration.params[k] for k in ("dataset", "samples", "seq_len")}
    text = calibration.data.get("text")
    return {**settings, "text": text} if text else settings
