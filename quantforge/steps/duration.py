"""How long a build's steps take, roughly: enough to tell before a nightly leg starts whether it can finish
within its runner's job limit (6 hours on GitHub's hosted runners), and nothing more. The figures are a model,
not a promise: within a factor of two for the CPU figures, and a guess for a GPU.

Each step kind costs work over a rate. The rates come from what was measured on this project's 2-core machines
(README "Big models" and "Benchmarks", DESIGN.md), divided per core and multiplied by the runner's cores:

    torch forward, fp32 (reference, importance matrix)  parameters x tokens   Qwen2 0.5B at 48 tok/s on 2 cores
    llama.cpp evaluation of a GGUF                      parameters x tokens   Qwen2 3B: 2 types x 1024 tokens, 101 s
    llama.cpp quantization                              parameters            Qwen2 3B: Q8_0 + Q4_K_M in 264 s
    conversion to GGUF (one Python thread: not scaled)  bytes written         Qwen2 3B: 6.2 GB in 36 s
    GPTQModel GPTQ (AWQ: 6.6 times slower)              parameters x tokens   SmolLM2 135M, 32 x 512, 16 min

Downloads, uploads and copies are not measured here (no Hub is reachable): they assume 100 MB/s down, 50 MB/s
up, 300 MB/s to copy. On a GPU the torch passes, GPTQModel and llama.cpp's evaluation are counted as
GPU_CORES cores (a guess: no GPU has measured it here); conversion and quantization stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.plan import upstream_of_kind
from ..core.step import Step
from ..figures import format_duration
from .disk import SourceSize, output_bytes

TORCH_RATE = 0.5e9 * 48 / 2  # parameter-tokens per second per core, fp32 forward on a CPU
LLAMA_EVAL_RATE = 3.1e9 * 2 * 1024 / 101 / 2  # parameter-tokens per second per core
QUANTIZE_RATE = 3.1e9 * 2 / 264 / 2  # parameters per second per core
CONVERT_RATE = 6.17e9 / 36  # bytes per second
GPTQ_RATE = 135e6 * 32 * 512 / (16 * 60) / 2  # parameter-tokens per second per core
AWQ_SLOWER = 3.3 * 60 / 30  # AWQ's 3.3 min per layer against GPTQ's 30 s
DOWNLOAD_RATE = 100e6
UPLOAD_RATE = 50e6
COPY_RATE = 300e6
HASH_RATE = 1.3e9  # sha256 of every output (README "Benchmarks": 1.37 GB in about a second)
GPU_CORES = 200  # what one GPU counts as for the torch passes, GPTQModel and llama.cpp's evaluation: a guess
STEP_SECONDS = 10.0  # a process start, imports, a tokenizer: what every step costs besides its work
# pip's cache is cold on a fresh runner (or after a new pin): compiling llama.cpp takes 5-15 minutes on 2-4
# cores (README "Set-up"); with CUDA, longer
INSTALL_SECONDS = {False: 20 * 60, True: 40 * 60}

_TORCH_KINDS = ("eval.reference", "gguf.imatrix")
_GPTQMODEL_KINDS = {"gptq.quantize": 1.0, "awq.quantize": AWQ_SLOWER}


@dataclass(frozen=True)
class LegTime:
    seconds: float  # install + every step
    largest: str  # the step that takes longest, and how long
    install_seconds: float


def step_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    """About how long `step` takes on `cores` CPU cores (and a GPU when `gpu`)."""
    compute = GPU_CORES if gpu else cores  # for the kinds a GPU speeds up
    params = size.params
    if step.kind == "source":
        seconds = size.total_bytes / HASH_RATE
        if "commit" in step.params:  # a Hub source is downloaded
            seconds += size.total_bytes / DOWNLOAD_RATE
    elif step.kind in _TORCH_KINDS:
        seconds = params * _tokens(step) / (TORCH_RATE * compute) + size.weight_bytes / COPY_RATE
    elif step.kind == "gguf.convert":
        seconds = output_bytes(step, size) / CONVERT_RATE
    elif step.kind == "gguf.quantize":
        seconds = params / (QUANTIZE_RATE * cores) + output_bytes(step, size) / HASH_RATE
    elif step.kind in ("gguf.verify", "checkpoint.verify"):
        seconds = output_bytes(step.inputs["artifact"], size) / COPY_RATE
    elif step.kind == "gguf.evaluate":
        seconds = params * _tokens(step) / (LLAMA_EVAL_RATE * compute)
    elif step.kind == "checkpoint.evaluate":  # transformers with GPTQModel's kernels: as slow as fp32 torch
        seconds = params * _tokens(step) / (TORCH_RATE * compute)
    elif step.kind in _GPTQMODEL_KINDS:
        seconds = params * _tokens(step) * _GPTQMODEL_KINDS[step.kind] / (GPTQ_RATE * compute)
    elif step.kind == "publish.upload":
        seconds = output_bytes(step.inputs["artifact"], size) * (1 / UPLOAD_RATE + 1 / HASH_RATE)
    elif step.kind == "publish" and step.local.get("to", "").startswith("dir:"):
        seconds = sum(output_bytes(d, size) for d in step.inputs.values()) / COPY_RATE
    else:  # windows, gates, a card: seconds
        seconds = 0.0
    return STEP_SECONDS + seconds


def _tokens(step: Step) -> int:
    """The tokens a step runs the model over: its evaluation windows, or its calibration samples."""
    for role, a, b in (("tokens", "chunks", "ctx"), ("calibration", "samples", "seq_len")):
        if role in step.inputs:
            params = step.inputs[role].params
            return int(params[a]) * int(params[b])
    return 0


def leg_time(steps: Sequence[Step], run: Iterable[str], cores: int, gpu: bool) -> LegTime:
    """The time of the steps in `run` (labels), one after another as a build runs them, plus a cold install."""
    todo = set(run)
    sizes: dict[str, SourceSize] = {}
    timed: list[tuple[float, str]] = []
    for step in steps:
        source = upstream_of_kind(step, "source")
        if step.label not in todo or source is None:
            continue
        size = sizes.setdefault(source.label, SourceSize.of(source))
        timed.append((step_seconds(step, size, cores, gpu), step.label))
    install = INSTALL_SECONDS[gpu]
    top = max(timed, default=(0.0, ""))
    return LegTime(install + sum(s for s, _ in timed), f"{top[1]} {format_duration(top[0])}", install)

