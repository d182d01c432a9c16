"""Throughputs the time estimates divide work by (steps/duration.py; each kind's Estimates.seconds), measured on
this project's 2-core machines (README "Benchmarks", DESIGN.md), per core:

    torch forward, fp32 (reference, importance matrix,  parameters x tokens   Qwen2 0.5B at 48 tok/s on 2 cores
      transformers evaluation of a checkpoint)
    sha256 of every output                              bytes                 1.37 GB in about a second

Downloads, uploads and copies are not measured here (no Hub is reachable): they assume 100 MB/s down, 50 MB/s
up, 300 MB/s to copy. On a GPU the kinds a GPU speeds up count it as GPU_CORES cores (a guess: no GPU has
measured it here). A format's own tools (llama.cpp, GPTQModel, ...) keep their rates in the format's module.
"""

from __future__ import annotations

from typing import Protocol

from ..core.step import Step

TORCH_RATE = 0.5e9 * 48 / 2  # parameter-tokens per second per core, fp32 forward on a CPU
DOWNLOAD_RATE = 100e6
UPLOAD_RATE = 50e6
COPY_RATE = 300e6
HASH_RATE = 1.3e9
GPU_CORES = 200  # what one GPU counts as for the work it speeds up: a guess


class Sized(Protocol):
    """What a time estimate reads of a source's size (steps.disk.SourceSize)."""

    total_bytes: int
    weight_bytes: int
    params: int


def compute_cores(cores: int, gpu: bool) -> int:
    """The cores work a GPU speeds up runs on."""
    return GPU_CORES if gpu else cores


def token_shape(step: Step) -> tuple[int, int]:
    """The (windows, length) a step runs the model over: its evaluation windows, or its calibration samples."""
    for role, count, length in (("tokens", "chunks", "ctx"), ("calibration", "samples", "seq_len")):
        if role in step.inputs:
            params = step.inputs[role].params
            return int(params[count]), int(params[length])
    raise KeyError(f"{step.kind} reads neither evaluation windows nor calibration samples")


def step_tokens(step: Step) -> int:
    """How many tokens a step runs the model over (0: none)."""
    try:
        count, length = token_shape(step)
    except KeyError:
        return 0
    return count * length


def torch_pass_seconds(step: Step, size: Sized, cores: int, gpu: bool) -> float:
    """A forward pass of the source over a step's tokens in torch, after copying its weights in."""
    return size.params * step_tokens(step) / (TORCH_RATE * compute_cores(cores, gpu)) + size.weight_bytes / COPY_RATE
