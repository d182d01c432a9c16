"""What the FP8 steps cost, known before anything runs: the `Estimates` of their step kinds (formats/fp8.py),
which the memory, disk, duration and runner-fit plans ask.

Quantizing loads the whole model in its own dtype (compressed-tensors works on a loaded model) and adds the FP8
copy of each linear weight while it packs them; the checks load the checkpoint in transformers, which keeps the
FP8 weights until the first forward and then decompresses them to the compute dtype (float32 on a CPU).
The figures below were measured with `quantforge build --json` (each step's peak_rss_bytes and seconds) on
SmolLM2-135M (fp32, 538 MB) on 2 busy cores: quantize 1.29 GB peak (estimated 1.28), 12.8 s of quantizing and
packing; verify 1.13 GB (1.15); evaluate 1.29 GB (1.42) at 34.5 tokens/s, against 82 for the source's fp32
reference pass on the same machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.step import Step
from ..steps.disk import SourceSize
from ..steps.memory import StepMemory, source_shapes
from ..steps.rates import COPY_RATE, TORCH_RATE, compute_cores, step_tokens
from ..toolchains.memory import HostMemory

# the workers' resident memory with torch, transformers and compressed-tensors imported, before the model (the
# checks also hold a tokenizer): fitted to the tiny test models and SmolLM2
QUANTIZE_BASELINE = 400 * 2**20
BASELINE = 450 * 2**20
# computing the scales and packing the FP8 weights: parameters per second per core
QUANTIZE_RATE = 134.5e6 / 12.8 / 2
# the compressed forward against a plain fp32 one: each quantized layer also rounds its input to FP8 per token
CONSUMER_SLOWER = 82 / 34.5
# transformers decompresses the FP8 weights on the first forward: parameters per second (SmolLM2: 3.3 s), one thread
DECOMPRESS_RATE = 134.5e6 / 3.3
# the upper bound of the parameters that stay in the source's dtype (embeddings and an untied head): 21% in
# SmolLM2-135M, 28% in Qwen2.5-0.5B, 13% in Llama-3-8B
KEPT_SHARE = 0.3


@dataclass(frozen=True)
class Shapes:
    params: int
    itemsize: int  # bytes per parameter as stored
    kept_params: int  # embeddings and an untied head, which stay in the source's dtype
    vocab: int

    @property
    def weight_bytes(self) -> int:
        return self.params * self.itemsize

    @property
    def linear_params(self) -> int:
        return self.params - self.kept_params


@lru_cache(maxsize=16)
def shapes(source_dir: Path) -> Shapes:
    """From the source's config.json and safetensors headers (no weight is read)."""
    shared = source_shapes(source_dir)
    config = json.loads((source_dir / "config.json").read_text())
    tied = config.get("tie_word_embeddings", True)
    vocab = int(config.get("text_config", config)["vocab_size"])
    return Shapes(shared.params, shared.itemsize, vocab * shared.hidden * (1 if tied else 2), vocab)


def _ctx(step: Step) -> int:
    tokens = step.inputs.get("tokens")
    return int(tokens.params["ctx"]) if tokens is not None else 64  # verify: a prompt and a few tokens


# ------------------------------------------------------------------------------------------------- quantize

def quantize_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    """The model as stored, its linear weights in FP8 as they are packed, and the state dict as it is written (FP8
    weights again, the embeddings and an untied head in the source's dtype)."""
    s = shapes(source_dir)
    written = s.linear_params + s.kept_params * s.itemsize
    return StepMemory(step.label, step.kind, QUANTIZE_BASELINE + s.weight_bytes + s.linear_params + written, None,
                      "compressed-tensors: the whole model in its own dtype, plus its linear weights in FP8")


def quantize_floor(step: Step, size: SourceSize) -> tuple[int, str]:
    return (QUANTIZE_BASELINE + size.weight_bytes + 2 * size.params,
            "compressed-tensors loads the whole model in its own dtype, and packs its weights in FP8")


def checkpoint_bytes(step: Step, size: SourceSize) -> int:
    """One byte per linear weight, the embeddings (and an untied head) in the source's dtype: an upper bound,
    counting KEPT_SHARE of the parameters at the source's bytes per parameter."""
    per_param = size.weight_bytes / max(size.params, 1)
    return int(size.params * (1 - KEPT_SHARE) + size.params * KEPT_SHARE * per_param) + size.vocab_bytes


def quantize_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    return (size.weight_bytes / COPY_RATE + size.params / (QUANTIZE_RATE * cores)
            + checkpoint_bytes(step, size) / COPY_RATE)


# ------------------------------------------------------------------------------------ verify and evaluate

def consumer_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    """transformers with compressed-tensors: the FP8 weights until the first forward, then the model in the compute
    dtype (float32 on a CPU, bfloat16 on a GPU), and one window's logits (fp32, three copies while scored)."""
    s = shapes(source_dir)
    logits = _ctx(step) * s.vocab * 4 * 3
    if gpu is not None:
        return StepMemory(step.label, step.kind, BASELINE, 2 * s.params + s.linear_params + logits,
                          "transformers, compressed-tensors forward in bfloat16 on the GPU")
    return StepMemory(step.label, step.kind, BASELINE + 4 * s.params + s.linear_params + logits, None,
                      "transformers, compressed-tensors forward in float32 (weights decompressed)")


def consumer_floor(step: Step, size: SourceSize) -> tuple[int, str]:
    return BASELINE + 5 * size.params, "transformers decompresses the FP8 weights to float32 on a CPU"


def _load_seconds(size: SourceSize) -> float:
    return size.params / COPY_RATE + size.params / DECOMPRESS_RATE


def verify_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    # a prompt and 8 tokens: the load and the decompression are the work
    return _load_seconds(size) + size.params * 8 * 16 / (TORCH_RATE * compute_cores(cores, gpu))


def evaluate_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    forward = size.params * step_tokens(step) * CONSUMER_SLOWER / (TORCH_RATE * compute_cores(cores, gpu))
    return _load_seconds(size) + forward
