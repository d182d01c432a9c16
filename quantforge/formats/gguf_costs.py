"""What GGUF's steps cost, known before anything runs: memory from the source's shapes, disk from each type's
bits per weight, time from llama.cpp's throughputs. Registered with the kinds (formats/gguf.py), read by the
memory, disk and runner-fit plans.

Throughputs, measured on this project's 2-core machines (README "Benchmarks"), per core:

    llama.cpp evaluation of a GGUF                      parameters x tokens   Qwen2 3B: 2 types x 1024 tokens, 101 s
    llama.cpp quantization                              parameters            Qwen2 3B: Q8_0 + Q4_K_M in 264 s
    conversion to GGUF (one Python thread: not scaled)  bytes written         Qwen2 3B: 6.2 GB in 36 s
"""

from __future__ import annotations

from pathlib import Path

from ..core.registry import Estimates
from ..core.step import Step
from ..gguf_types import BITS_PER_WEIGHT
from ..steps.disk import SourceSize, output_bytes
from ..steps.memory import StepMemory, source_shapes, torch_pass_memory
from ..steps.rates import COPY_RATE, HASH_RATE, compute_cores, step_tokens, torch_pass_seconds
from ..toolchains.memory import HostMemory

LLAMA_EVAL_RATE = 3.1e9 * 2 * 1024 / 101 / 2  # parameter-tokens per second per core
QUANTIZE_RATE = 3.1e9 * 2 / 264 / 2  # parameters per second per core
CONVERT_RATE = 6.17e9 / 36  # bytes per second
INTERMEDIATE_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "auto": 2.0}  # auto: a 16-bit type
# RSS of llama.cpp's converter (it imports torch) and of the quantize worker (numpy, llama_cpp) before they hold
# any of the model; with the bytes per element of the largest tensor below, fitted to scripts/bench_scale.py's
# Qwen2/Llama 0.1B and 0.5B (within 2% for the converter; the quantizer's 8 bytes are 10-15% above what it used)
CONVERTER_BASELINE = 350 * 2**20
QUANTIZE_BASELINE = 100 * 2**20


def _convert_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    shapes = source_shapes(source_dir)
    # the converter's lazy tensors: one tensor at a time, as stored, in fp32, and as written (16-bit)
    return StepMemory(step.label, step.kind, CONVERTER_BASELINE + shapes.largest_numel * (shapes.itemsize + 4 + 2),
                      None, "llama.cpp converter, one tensor at a time")


def _quantize_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    # llama_model_quantize reads a tensor (16-bit), converts it to fp32 and quantizes it
    return StepMemory(step.label, step.kind, QUANTIZE_BASELINE + source_shapes(source_dir).largest_numel * (2 + 4 + 2),
                      None, "llama.cpp quantizer, one tensor at a time")


def _intermediate_bytes(step: Step, size: SourceSize) -> int:
    per_weight = INTERMEDIATE_BYTES_PER_WEIGHT.get(step.params.get("outtype", "auto"), 2.0)
    return int(size.params * per_weight) + size.vocab_bytes


def _quantized_bytes(step: Step, size: SourceSize) -> int:
    bits = BITS_PER_WEIGHT.get(step.params.get("type", ""), 16.0)
    return int(size.params * bits / 8) + size.vocab_bytes


CONVERT = Estimates(memory=_convert_memory, output_bytes=_intermediate_bytes,
                    seconds=lambda step, size, cores, gpu: output_bytes(step, size) / CONVERT_RATE)
QUANTIZE = Estimates(
    memory=_quantize_memory, output_bytes=_quantized_bytes,
    seconds=lambda step, size, cores, gpu: size.params / (QUANTIZE_RATE * cores) + output_bytes(step, size) / HASH_RATE)
VERIFY = Estimates(seconds=lambda step, size, cores, gpu: output_bytes(step.inputs["artifact"], size) / COPY_RATE)
EVALUATE = Estimates(seconds=lambda step, size, cores, gpu:
                     size.params * step_tokens(step) / (LLAMA_EVAL_RATE * compute_cores(cores, gpu)))
IMATRIX = Estimates(memory=torch_pass_memory, seconds=torch_pass_seconds)


def _search_runs(step: Step, size: SourceSize) -> int:
    """A search's quantize+evaluate runs: two per tensor group (7 kinds of layer tensor in each depth band, the
    output, the embeddings) and the baseline; the model's own count is known only once it is converted."""
    return step.params["probes"] * (7 * step.params["bands"] + 2) + 1


def _search_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    tokens = step.params["windows"] * step.inputs["calibration"].params["seq_len"]
    evaluate = size.params * tokens / (LLAMA_EVAL_RATE * compute_cores(cores, gpu))
    quantize = size.params / (QUANTIZE_RATE * cores)
    return (_search_runs(step, size) + 1) * evaluate + _search_runs(step, size) * quantize


# each probe file (Q8_0) is written, measured and overwritten by the next
SENSITIVITY = Estimates(memory=_quantize_memory, scratch_bytes=lambda step, size: int(size.params * 8.5 / 8),
                        seconds=_search_seconds)
