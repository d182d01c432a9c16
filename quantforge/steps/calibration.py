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
from ..data import cut_calibration, load_text, text_identity
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

@step_kind("calibration", version="2")  # 2: BOS only when the tokenizer adds one
def run_calibration(step: Step, ctx: StepContext) -> dict[str, Any]:
    text = load_text(local_text_source(step))
    tokenized = tokenizer_worker.tokenize(Path(ctx.inputs["source"].data["path"]), [text], ctx.out_dir,
                                          ctx.log_path)
    [ids] = tokenized.ids
    windows, first = cut_calibration(ids, step.params["seq_len"], step.params["samples"], tokenized.window_bos,
                                     after=step.local.get("evaluation_tokens", 0))
    np.save(ctx.out_dir / CALIBRATION_FILE, windows)
    return {"text_tokens": len(ids), "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "first_token": first, "bos_id": tokenized.bos_id, "adds_bos": tokenized.adds_bos}


def calibration_settings(calibration: StepOutput) -> dict[str, Any]:
    """The text, samples and window length a calibration step used, as cards and manifests describe them."""
    return {k: calibration.params[k] for k in ("dataset", "samples", "seq_len")}
