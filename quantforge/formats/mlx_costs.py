"""What MLX's steps cost, known before anything runs: registered with the kinds (formats/mlx.py), read by the
memory, disk and runner-fit plans. Measured with formats/mlx_worker.py (mlx 0.32, mlx-lm 0.32, CPU backend, 2 cores)
on SmolLM2-135M and random Llama shapes of 0.5B and 1.5B parameters (scripts/bench_scale.py's):

    convert, 4-bit   135M 2.5 s 0.63 GB   0.5B 5.2 s 1.01 GB   1.5B 10.5 s 1.83 GB   (work, peak RSS)
    convert, 8-bit                        0.5B 5.4 s 1.23 GB   1.5B 12.0 s 2.32 GB
    evaluate         parameters x tokens at about 1.3e9 per second, in float32 on the CPU, not faster with more
                     cores (SmolLM2-135M, 8 windows of 512 tokens: 421 s, 9.7 tokens/s, 0.79 GB peak)

mlx-lm writes its output in shards of at most 5 GB, evaluating one at a time: beyond that size the convert's peak
is assumed to stop growing (not measured here). MLX has no CUDA backend in this install: a GPU speeds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.registry import Estimates
from ..core.step import Step
from ..steps.disk import SourceSize, output_bytes
from ..steps.memory import StepMemory
from ..steps.rates import COPY_RATE, HASH_RATE, step_tokens, token_shape
from ..toolchains.memory import HostMemory

# RSS of the worker before it holds any of the model (mlx, mlx-lm and transformers' tokenizer imported)
MLX_BASELINE = 600 * 2**20
SHARD_BYTES = 5 * 10**9  # mlx-lm's MAX_FILE_SIZE_GB
CONVERT_PEAK_PER_OUTPUT_BYTE = 1.5  # the shard being written and the source tensors it is made from
CONVERT_RATE = 1.8e8  # parameters per second: (1.43e9 - 0.48e9) parameters in (10.5 - 5.2) s
EVAL_RATE = 135e6 * 4096 / 421  # parameter-tokens per second, whatever the cores
LOGITS_COPIES = 3  # the model's output, its float32 cast, numpy's copy (SmolLM2-135M, 512 tokens: 0.79 GB peak)


def effective_bits(params: dict) -> float:
    """Bits per quantized weight, before the scales: a mixed recipe mixed_L_H gives about a tenth of the weights
    H bits (SmolLM2-135M, mixed_3_6: 3.31)."""
    recipe = params.get("recipe")
    if recipe:
        low, high = (int(part) for part in recipe.split("_")[1:])
        return low + 0.1 * (high - low)
    return float(params.get("bits", 4))


def _folder_bytes(step: Step, size: SourceSize) -> int:
    # a 16-bit scale and bias per group, the tokenizer files as they are (vocab_bytes counts half of them)
    bits = effective_bits(dict(step.params)) + 32 / int(step.params.get("group_size", 64))
    return int(size.params * bits / 8) + 2 * size.vocab_bytes


def _convert_peak(out: int) -> int:
    return MLX_BASELINE + int(CONVERT_PEAK_PER_OUTPUT_BYTE * min(out, SHARD_BYTES))


def _convert_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    out = output_bytes(step, SourceSize.of(step.inputs["source"]))
    return StepMemory(step.label, step.kind, _convert_peak(out), None,
                      "mlx-lm, one output shard of at most 5 GB at a time")


def _evaluate_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    config = json.loads((source_dir / "config.json").read_text())
    vocab = int(config.get("text_config", config)["vocab_size"])
    _, ctx = token_shape(step)
    folder = output_bytes(step.inputs["artifact"], SourceSize.of(step.inputs["source"]))
    # the whole folder in memory, its scales widened to float32 on a CPU (about a ninth more at 4 bits), and one
    # window's logits over the vocabulary
    host_bytes = MLX_BASELINE + int(folder * 1.15) + LOGITS_COPIES * 4 * ctx * vocab
    return StepMemory(step.label, step.kind, host_bytes, None, "mlx-lm, the whole model, one window at a time")


def _evaluate_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    return size.params * step_tokens(step) / EVAL_RATE


CONVERT = Estimates(
    memory=_convert_memory, output_bytes=_folder_bytes,
    seconds=lambda step, size, cores, gpu: size.params / CONVERT_RATE + output_bytes(step, size) / HASH_RATE,
    host_floor=lambda step, size: (_convert_peak(output_bytes(step, size)),
                                   "mlx-lm, one output shard of at most 5 GB at a time"))
VERIFY = Estimates(seconds=lambda step, size, cores, gpu:
                   output_bytes(step.inputs["artifact"], size) / COPY_RATE + size.params * 16 / EVAL_RATE)
EVALUATE = Estimates(memory=_evaluate_memory, seconds=_evaluate_seconds)
