"""Where torch work runs: bf16 on a CUDA GPU when there is one, else fp32 on the CPU. One check for every step;
and, per step, whether the source model runs whole or streamed one decoder layer at a time (layerwise), from
its memory estimate against what the device has free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layerwise import PeakEstimate

# Host memory the CUDA runtime, cuBLAS and torch's CUDA kernels hold once a process has used the GPU (measured
# 0.6-1.2 GB with torch 2.x; the larger figure, to be safe)
CUDA_HOST_BYTES = 1200 * 2**20
# The whole model only when its estimate leaves a fifth of what is free: estimates are not measurements, and an
# out-of-memory kill costs the whole step, while streaming costs only some speed
COMFORT = 0.8
PATHS = ("whole-model", "streamed")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device() -> tuple[str, str]:
    """(device, dtype name) for the source model's forward passes."""
    return ("cuda", "bfloat16") if cuda_available() else ("cpu", "float32")


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded, without importing torch (which costs a plan a second)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first CUDA device, or None when torch sees none."""
    if not cuda_available():
        return None
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return int(free), int(total)


@dataclass(frozen=True)
class ForwardChoice:
    path: str  # "whole-model" | "streamed"
    device: str  # "cuda" | "cpu"
    dtype: str  # "bfloat16" | "float32"
    host_bytes: int  # expected peak host memory of the process
    device_bytes: int  # expected peak GPU memory (0 on the CPU)
    available: int  # what the chosen device had free: host bytes on the CPU, GPU bytes on a GPU

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "device": self.device, "dtype": self.dtype, "estimated_host_bytes": self.host_bytes,
                "estimated_gpu_bytes": self.device_bytes, "available_bytes": self.available}


def choose_forward(estimate: Callable[[str], PeakEstimate], host_available: int, gpu_free: int | None,
                   forced: str | None = None) -> ForwardChoice:
    """The device, dtype and path of a forward pass over the source model. `estimate(dtype)` gives its peak
    memory; `gpu_free` is None without a GPU. On a GPU: the whole model if it fits comfortably, else streamed
    layer by layer onto the GPU, else the CPU. On the CPU: the whole model if it fits comfortably, else streamed.
    `forced` picks the path regardless (QUANTFORGE_TORCH_PATH)."""
    if forced is not None and forced not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, not {forced!r}")
    if gpu_free is not None:
        est = estimate("bfloat16")
        # weights go to the GPU one tensor at a time: the host holds the runtime and the tensor in flight
        from .layerwise import BASELINE_BYTES

        host = BASELINE_BYTES + CUDA_HOST_BYTES + est.largest_stored
        for path, on_device in zip(PATHS, (est.whole_model_device, est.streamed_device), strict=True):
            if forced in (None, path) and on_device <= COMFORT * gpu_free:
                return ForwardChoice(path, "cuda", "bfloat16", host, on_device, gpu_free)
    est = estimate("float32")
    whole = forced == "whole-model" or (forced is None and est.whole_model <= COMFORT * host_available)
    return ForwardChoice("whole-model" if whole else "streamed", "cpu", "float32",
                         est.whole_model if whole else est.streamed, 0, host_available)
