"""The source model's torch passes (the evaluation reference, the importance matrix) in a child process.

    python -m quantforge.toolchains.torch_worker --result FILE reference SRC --windows NPY --out NPZ --top-k K
                                                               [--path whole-model|streamed]
    python -m quantforge.toolchains.torch_worker --result FILE imatrix SRC --windows NPY --out NPZ
                                                               [--path whole-model|streamed]

Why a child: a 7B-32B model holds tens of GB, and an out-of-memory kill must fail one step with a clear message,
not the build; torch's and transformers' own warnings (torchao, triton, _pytree) go to the step's log, not the
user's console; and the memory a pass used is measured on its own process tree.

The child runs the whole model (as transformers loads it) when its estimate fits comfortably in what the device
has free, else streams it one decoder layer at a time (layerwise.stream_forward); both give the same figures
(fp32 on a CPU: the same logits and importance matrix to float precision). The choice, the device and dtype,
the estimate and the peaks measured are returned with the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantforge.errors import BadInputError, OutOfMemory, SourceError, ToolchainError
from quantforge.toolchains.device import PATHS, ForwardChoice, choose_forward, gpu_memory, torch_device
from quantforge.toolchains.layerwise import (
    CheckpointMismatch,
    UnsupportedArchitecture,
    estimate_peak_bytes,
    mismatch_text,
    stream_forward,
)
from quantforge.toolchains.memory import host_memory
from quantforge.toolchains.worker import report_progress, run_worker, serve

if TYPE_CHECKING:
    import torch

WORKER = "quantforge.toolchains.torch_worker"
PATH_ENV = "QUANTFORGE_TORCH_PATH"  # whole-model | streamed: overrides the choice (benchmarks, tests, doubts)
OOM_HINT = ("give it more memory, or fewer evaluation windows or calibration samples (evaluation.chunks, "
            "calibration.samples), or a CUDA GPU; QUANTFORGE_TORCH_PATH=streamed holds one decoder layer at a time")


# ------------------------------------------------------------------------------------------ parent side

def reference(source_dir: Path, windows: Path, out_file: Path, top_k: int, log_path: Path, *, label: str,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The source model's top-k log-probs on the evaluation windows, saved as a metrics.Reference in `out_file`;
    returns PPL, speed, the path taken and the memory used."""
    return _run("reference", [str(source_dir), "--windows", str(windows), "--out", str(out_file),
                              "--top-k", str(top_k)], out_file, log_path, label, progress)


def imatrix(source_dir: Path, windows: Path, out_file: Path, log_path: Path, *, label: str,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The mean squared input per column of every linear layer but the output head over the calibration windows,
    saved as an .npz under Hugging Face module names."""
    return _run("imatrix", [str(source_dir), "--windows", str(windows), "--out", str(out_file)], out_file,
                log_path, label, progress)


def _run(command: str, args: list[str], out_file: Path, log_path: Path, label: str,
         progress: Callable[[str], None] | None) -> dict[str, Any]:
    forced = os.environ.get(PATH_ENV) or None
    if forced is not None:
        if forced not in PATHS:
            raise BadInputError(f"{PATH_ENV}={forced!r}: expected one of {', '.join(PATHS)}")
        args = [*args, "--path", forced]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = run_worker(WORKER, [command, *args], log_path, out_file.with_name(f"{command}.result.json"),
                        progress=progress, env=env, label=label, oom_hint=OOM_HINT)
    if result.pop("ok", False):
        return result
    error = result.get("error", "unknown")
    if result.get("mismatch"):
        raise SourceError(error)
    if result.get("killed"):
        raise OutOfMemory(error)
    raise ToolchainError(f"{label}: the torch pass failed: {error}")


# ------------------------------------------------------------------------------------------- child side

def _choose(model_dir: Path, shape: tuple[int, int], forced: str | None) -> ForwardChoice:
    available = host_memory().available
    gpu = gpu_memory()
    try:
        return choose_forward(lambda dtype: estimate_peak_bytes(model_dir, shape, dtype), available,
                              None if gpu is None else gpu[0], forced)
    except (CheckpointMismatch, OSError, KeyError, ValueError) as exc:  # no safetensors, odd config: load it whole
        print(f"quantforge: no memory estimate ({exc}); loading the whole model", file=sys.stderr)
        device, dtype = torch_device()
        return ForwardChoice("whole-model", device, dtype, 0, 0, available)


def _load_whole(model_dir: Path, device: str, dtype: str) -> torch.nn.Module:
    """The model as transformers loads it; a checkpoint whose tensors are not the architecture's is an error
    (transformers would initialise the missing ones randomly and carry on)."""
    import torch
    from transformers import AutoModelForCausalLM

    # on a GPU, straight onto it: loading on the host first would hold the whole model there
    placement = {} if device == "cpu" else {"device_map": {"": device}}
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                       output_loading_info=True, **placement)
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys") or ()]
    arch = type(model).__name__
    if missing or unexpected:
        raise CheckpointMismatch(f"{model_dir}: the checkpoint {mismatch_text(arch, missing, unexpected)}")
    if mismatched:
        raise CheckpointMismatch(f"{model_dir}: the checkpoint has {len(mismatched)} tensor(s) of the wrong shape "
                                 f"for {arch}: {', '.join(sorted(mismatched)[:5])}")
    return model.to(device).eval()


class _Pass:
    """What both commands share: the windows, the choice of path, timing and the GPU peak."""

    def __init__(self, args: argparse.Namespace):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a log file, not a terminal
        self.model_dir: Path = args.source
        self.windows = np.load(args.windows)
        self.choice = _choose(self.model_dir, self.windows.shape, args.path)
        print(f"quantforge: {self.choice.path} pass on {self.choice.device} in {self.choice.dtype}: "
              f"{self.choice.to_json()}", file=sys.stderr, flush=True)
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {}

    def load_whole(self) -> torch.nn.Module:
        model = _load_whole(self.model_dir, self.choice.device, self.choice.dtype)
        self.data["load_seconds"] = round(time.perf_counter() - self.started, 2)
        return model

    def streamed(self, **kwargs: Any) -> tuple[bool, dict[str, np.ndarray] | None]:
        """Run stream_forward when that is the choice: (ran, its importance matrix). An architecture it cannot
        stream falls back to the whole model, with a line in the log."""
        if self.choice.path != "streamed":
            return False, None
        try:
            return True, stream_forward(self.model_dir, self.windows, device=self.choice.device,
                                        dtype=self.choice.dtype, progress=report_progress, **kwargs)
        except UnsupportedArchitecture as exc:
            print(f"quantforge: {exc}; loading the whole model instead", file=sys.stderr, flush=True)
            self.choice = dataclasses.replace(self.choice, path="whole-model")
            return False, None

    def result(self, **data: Any) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        data = {**data, **self.data}
        running = seconds - data.get("load_seconds", 0)  # streamed: loading is interleaved with running
        out: dict[str, Any] = {"ok": True, **data, **self.choice.to_json(), "seconds": round(seconds, 2),
                               "tokens_per_second": round(self.windows.size / running, 1)}
        if self.choice.device == "cuda":
            import torch

            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        return out


def _ids(window: np.ndarray, device: str) -> torch.Tensor:
    import torch

    return torch.from_numpy(window[None, :].astype(np.int64)).to(device)


def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from quantforge import metrics

    run = _Pass(args)
    windows, n = run.windows, len(run.windows)
    parts: dict[int, metrics.Reference] = {}

    def score(i: int, logits: np.ndarray) -> None:
        parts[i] = metrics.score_window(logits, windows[i], args.top_k)

    streamed, _ = run.streamed(on_logits=score)
    if not streamed:
        model = run.load_whole()
        with torch.inference_mode():
            for i, window in enumerate(windows):
                score(i, model(_ids(window, run.choice.device)).logits[0].float().cpu().numpy())
                report_progress(f"window {i + 1}/{n}")
        del model
    reference = metrics.concat([parts[i] for i in range(n)])
    reference.save(args.out)
    ppl, err = metrics.perplexity(reference.nll)
    return run.result(ppl=round(ppl, 4), ppl_err=round(err, 4), tokens_scored=len(reference.nll))


def run_imatrix(args: argparse.Namespace) -> dict[str, Any]:
    run = _Pass(args)
    streamed, matrix = run.streamed(imatrix_for=range(len(run.windows)))
    if not streamed:
        matrix = _whole_imatrix(run)
    assert matrix is not None
    np.savez(args.out, **matrix)
    return run.result(entries=len(matrix), tokens=int(run.windows.size))


def _whole_imatrix(run: _Pass) -> dict[str, np.ndarray]:
    """Forward hooks on every linear layer but the output head (llama-imatrix leaves it out by default)."""
    import torch

    model = run.load_whole()
    output_layer = model.get_output_embeddings()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squares = (x * x).sum(dim=0)
            sums[name] = sums[name] + squares if name in sums else squares
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not output_layer]
    try:
        with torch.inference_mode():
            for i, window in enumerate(run.windows):
                model(_ids(window, run.choice.device), use_cache=False)
                report_progress(f"sample {i + 1}/{len(run.windows)}")
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sorted(sums)}


def _guarded(command: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], dict]:
    """A checkpoint that does not match its architecture is the source's fault: said in one line, as data."""

    def run(args: argparse.Namespace) -> dict[str, Any]:
        try:
            return command(args)
        except CheckpointMismatch as exc:
            print(f"quantforge: {exc}", file=sys.stderr)
            return {"ok": False, "error": str(exc), "mismatch": True}

    return run


COMMANDS = {"reference": _guarded(run_reference), "imatrix": _guarded(run_imatrix)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torch_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        command = sub.add_parser(name)
        command.add_argument("source", type=Path)
        command.add_argument("--windows", type=Path, required=True)
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--path", choices=("whole-model", "streamed"))
        if name == "reference":
            command.add_argument("--top-k", type=int, required=True)
    return serve(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
