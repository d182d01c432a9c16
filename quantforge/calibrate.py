"""Calibration: token windows cut once per (source, text, samples, seq_len) and shared by every method that
calibrates; and the importance matrix that GGUF quantization weighs its errors with.

    source ─► calibration ─┬► gguf.imatrix ─► gguf.quantize[type]   (every type reuses one matrix)
                           ├► gptq.quantize
                           └► awq.quantize

The importance matrix is what llama.cpp's `llama-imatrix` tool computes — the mean squared activation of each
input column of each weight matrix over the calibration tokens — collected here with forward hooks on the
source model in torch (llama.cpp's tool needs a GGUF and a compiled binary the wheel does not ship). Entries
are stored under Hugging Face module names; the quantize step maps them to GGUF tensor names with the
converter's own name map, so the matrix does not depend on the converter version.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelTarget, Targets
from .data import cut_calibration, load_text, parse_text_source, resolve_paths, text_identity
from .plan import PlanContext, Step

if TYPE_CHECKING:
    from .engine import StepContext

CALIBRATION_FILE = "calibration.npy"
IMATRIX_FILE = "imatrix.npz"


def calibration_step(model: ModelTarget, targets: Targets, source: Step, context: PlanContext, *,
                     dataset: str | None = None, samples: int | None = None, seq_len: int | None = None) -> Step:
    """The calibration windows for `model`; formats that ask for the same text share one step."""
    default = model.calibration
    dataset = dataset or default.dataset
    samples = samples or default.samples
    seq_len = seq_len or default.seq_len
    spec, digest = text_identity(dataset, targets.base_dir, context.memo)
    label = f"{model.name}:calibration"
    if (dataset, samples, seq_len) != (default.dataset, default.samples, default.seq_len):
        label += f"-{samples}x{seq_len}"
        if dataset != default.dataset:
            label += "-" + hashlib.sha256(spec.encode()).hexdigest()[:8]
    return context.memo(f"step:{label}", lambda: Step(
        "calibration", label, params={"dataset": spec, "text_sha256": digest, "samples": samples,
                                      "seq_len": seq_len},
        inputs={"source": source}, model=model.name))


def imatrix_step(model: ModelTarget, source: Step, calibration: Step) -> Step:
    return Step("gguf.imatrix", f"{model.name}/gguf:imatrix", params={"statistic": "mean_squared_input"},
                inputs={"source": source, "calibration": calibration}, model=model.name, fmt="gguf")


def compute_device() -> tuple[str, str]:
    """(device, dtype) for calibration forward passes: bf16 on a GPU, fp32 on a CPU."""
    import torch

    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


# ------------------------------------------------------------------------------------------------ runners

def run_calibration(step: Step, ctx: StepContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    text = load_text(resolve_paths(parse_text_source(step.params["dataset"]), Path("/")))
    tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["source"].data["path"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows, first = cut_calibration(ids, step.params["seq_len"], step.params["samples"], tokenizer.bos_token_id)
    np.save(ctx.out_dir / CALIBRATION_FILE, windows)
    return {"text_tokens": len(ids), "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "first_token": first, "bos_id": tokenizer.bos_token_id}


def run_imatrix(step: Step, ctx: StepContext) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    windows = np.load(ctx.inputs["calibration"].file(CALIBRATION_FILE))
    device, dtype_name = compute_device()
    model = AutoModelForCausalLM.from_pretrained(ctx.inputs["source"].data["path"],
                                                 dtype=getattr(torch, dtype_name)).to(device).eval()
    output_layer = model.get_output_embeddings()  # llama-imatrix leaves the output matrix out by default
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squares = (x * x).sum(dim=0)
            sums[name] = sums[name] + squares if name in sums else squares
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not output_layer]
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for i, window in enumerate(windows):
                model(torch.from_numpy(window[None, :].astype(np.int64)).to(device), use_cache=False)
                ctx.progress(f"sample {i + 1}/{len(windows)}")
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - started
    matrix = {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sorted(sums)}
    np.savez(ctx.out_dir / IMATRIX_FILE, **matrix)
    calibration = {k: ctx.inputs["calibration"].manifest["params"][k] for k in ("dataset", "samples", "seq_len")}
    return {"entries": len(matrix), "tokens": int(windows.size), "calibration": calibration,
            "device": device, "dtype": dtype_name,
            "seconds": round(seconds, 2), "tokens_per_second": round(windows.size / seconds, 1)}
