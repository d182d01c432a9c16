"""The importance matrix GGUF quantization weighs its errors with (`formats.gguf.imatrix: true`): one per model,
computed from the calibration windows and reused by every type.

    source ─► calibration ─► gguf.imatrix ─► gguf.quantize[type]

It is what llama.cpp's `llama-imatrix` tool computes — the mean squared activation of each input column of each
weight matrix over the calibration tokens — collected here with forward hooks on the source model in torch
(llama.cpp's tool needs a GGUF and a compiled binary the wheel does not ship). Entries are stored under Hugging
Face module names; the quantize step maps them to GGUF tensor names with the converter's own name map, so the
matrix does not depend on the converter version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.schema import ModelTarget
from ..core.registry import step_kind
from ..core.step import Step, StepContext
from ..steps.calibration import CALIBRATION_FILE, calibration_settings
from ..toolchains import torch_worker
from . import gguf_costs

IMATRIX_FILE = "imatrix.npz"


def imatrix_step(model: ModelTarget, source: Step, calibration: Step) -> Step:
    return Step("gguf.imatrix", f"{model.name}/gguf:imatrix", params={"statistic": "mean_squared_input"},
                inputs={"source": source, "calibration": calibration}, model=model.name, fmt="gguf")


@step_kind("gguf.imatrix", version="1", estimates=gguf_costs.IMATRIX)
def run_imatrix(step: Step, ctx: StepContext) -> dict[str, Any]:
    # in a child process, streamed layer by layer when the model would not fit whole (see torch_worker)
    result = torch_worker.imatrix(Path(ctx.inputs["source"].data["path"]),
                                  ctx.inputs["calibration"].file(CALIBRATION_FILE), ctx.out_dir / IMATRIX_FILE,
                                  ctx.log_path, label=step.label, progress=ctx.progress)
    return {"entries": result.pop("entries"), "tokens": result.pop("tokens"),
            "calibration": calibration_settings(ctx.inputs["calibration"]), **result}
