"""Child process for the FP8 format (formats/fp8.py): the only module that imports compressed-tensors. It
quantizes a checkpoint to FP8 and runs the result in transformers, its consumer on a machine without vLLM.

    python -m quantforge.formats.fp8_worker --result FILE quantize SRC OUT --scheme dynamic [--ignore NAME ...]
                                                          [--trust-remote-code]
    python -m quantforge.formats.fp8_worker --result FILE generate DIR --prompt TEXT [--tokens N]
    python -m quantforge.formats.fp8_worker --result FILE evaluate DIR --windows NPY --reference NPZ [--sample JSON]

Output (tqdm bars, torchao's "Failed to load ... .so" lines on import) goes to the step's log; the outcome is JSON
in --result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from quantforge.toolchains import transformers_checks
from quantforge.toolchains.device import torch_device
from quantforge.toolchains.worker import check_commands, report_progress, serve

# scheme (formats.fp8.scheme) -> compressed-tensors' preset, the one llm-compressor's recipes name too
PRESETS = {"dynamic": "FP8_DYNAMIC"}
# what vLLM reads from config.json to pick its FP8 kernels: compressed-tensors' name for FP8 tensors
FORMAT = "float-quantized"
# the size of the safetensors shards written, as most Hub repos hold them (transformers' default, 50GB, is the
# Hub's own limit per file)
SHARD_SIZE = "5GB"
# Copied from the source as they are: what a consumer tokenizes and generates with should be the source's own,
# not transformers' re-serialization of it
SOURCE_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
                "chat_template.*", "generation_config.json")


class Refused(ValueError):
    """What the settings or the model ask cannot be made: said to the user as such, without a traceback."""


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    """FP8 weights, one scale per output channel (their absolute maximum over 448, e4m3's largest value), computed
    from the weights alone: FP8_DYNAMIC needs no calibration (activations are scaled per token when they run).
    compressed-tensors then packs the checkpoint as llm-compressor's `oneshot` would (byte for byte, on
    SmolLM2-135M)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils import is_match
    from transformers import AutoModelForCausalLM

    report_progress("loading")
    started = time.perf_counter()
    # the source's own dtype: the layers FP8 leaves alone (embeddings, norms, the head) and the scales keep it
    model = AutoModelForCausalLM.from_pretrained(str(args.source), dtype="auto",
                                                 trust_remote_code=args.trust_remote_code)
    load_seconds = time.perf_counter() - started
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    _refuse_weights_outside_linears(model, linears.values())
    head = model.get_output_embeddings()
    # the output head stays in the source's dtype, as in llm-compressor's FP8 recipes (`ignore: [lm_head]`)
    ignore = [name for name, m in linears.items() if m is head] + list(args.ignore)
    for pattern in args.ignore:
        if not any(is_match(name, m, pattern) for name, m in linears.items()):
            raise Refused(f"formats.fp8.ignore: {pattern!r} matches no linear layer of the model (its linear layers "
                          f"are named like {', '.join(list(linears)[:3])})")
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(PRESETS[args.scheme], ["Linear"])},
                                ignore=ignore, quantization_status=QuantizationStatus.INITIALIZED)
    report_progress("quantizing")
    started = time.perf_counter()
    apply_quantization_config(model, config)
    quantized = [(name, m) for name, m in linears.items() if getattr(m, "quantization_scheme", None) is not None]
    if not quantized:
        raise Refused("formats.fp8.ignore leaves no linear layer to quantize")
    with torch.no_grad():
        for _, module in quantized:
            weight = module.weight
            scale, zero_point = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True),
                                                  module.quantization_scheme.weights)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    report_progress("compressing")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    compressor.compress_model(model)
    quantize_seconds = time.perf_counter() - started
    report_progress("saving")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), max_shard_size=SHARD_SIZE)
    compressor.update_config(str(args.out))
    _copy_source_files(args.source, args.out, args.trust_remote_code)
    return {"ok": True, "dtype": str(model.dtype).removeprefix("torch."), "ignored": ignore,
            "quantized_layers": len(quantized),
            "quantized_weights": sum(m.in_features * m.out_features for _, m in quantized),
            "n_params": sum(p.numel() for p in model.parameters()),  # tied weights once
            "load_seconds": round(load_seconds, 2), "quantize_seconds": round(quantize_seconds, 2),
            "save_seconds": round(time.perf_counter() - started, 2)}


def _refuse_weights_outside_linears(model, linears) -> None:
    """FP8 here quantizes linear layers. A model that keeps its weight matrices elsewhere would come out partly
    quantized, under a config that tells vLLM every such layer is FP8: fused mixture-of-experts tensors
    (transformers 5 holds each layer's experts as one 3-D parameter), GPT-2's Conv1D."""
    import torch

    covered = {id(m.weight) for m in linears}
    covered |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    others = [name for name, p in model.named_parameters() if p.ndim >= 2 and id(p) not in covered]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise Refused(f"formats.fp8: the model keeps weight matrices outside linear layers ({others[0]}{more}: "
                      "fused mixture-of-experts tensors, or Conv1D), which FP8 here does not quantize; vLLM would "
                      "expect them in FP8 too: not supported")


def _copy_source_files(source: Path, out: Path, remote_code: bool) -> None:
    patterns = SOURCE_FILES + (("*.py",) if remote_code else ())
    for path in sorted(source.iterdir()):
        if path.is_file() and any(path.match(p) for p in patterns):
            shutil.copyfile(path, out / path.name)


def _load(checkpoint: Path, trust_remote_code: bool = False):
    """The checkpoint as transformers runs it by default: FP8 weights, decompressed on the first forward, and
    every quantized layer's input rounded to FP8 per token on each call: the arithmetic of vLLM's W8A8 kernels,
    simulated in float32 on a CPU (bfloat16 on a GPU, which is what vLLM computes in)."""
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = torch_device()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype), device_map=device,
                                                 trust_remote_code=trust_remote_code).eval()
    return model, time.perf_counter() - started, dtype


def _quantized_layers(model) -> int:
    return sum(1 for m in model.modules() if getattr(getattr(m, "quantization_scheme", None), "weights", None))


def generate(args: argparse.Namespace) -> dict[str, Any]:
    model, load_seconds, dtype = _load(args.checkpoint, args.trust_remote_code)
    layers = _quantized_layers(model)
    if not layers:
        return {"ok": False, "error": "transformers loaded no quantized layer (quantization_config ignored?)"}
    result = transformers_checks.generate(model, args.checkpoint, args.prompt, args.tokens, args.trust_remote_code)
    return {**result, "quantized_layers": layers, "dtype": dtype, "load_seconds": round(load_seconds, 2)}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the checkpoint on the harness's windows (the same token ids the source model saw)."""
    model, _, dtype = _load(args.checkpoint, args.trust_remote_code)
    result = transformers_checks.evaluate(model, args.checkpoint, args.windows, args.reference, args.sample,
                                          args.trust_remote_code)
    return {**result, "device": str(model.device), "dtype": dtype, "quantized_layers": _quantized_layers(model)}


def _quantize_or_refuse(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return quantize(args)
    except Refused as exc:  # the user's settings, not a crash: said as such (no traceback in the log)
        return {"ok": False, "error": str(exc), "bad_input": True}


COMMANDS = {"quantize": _quantize_or_refuse, "generate": generate, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp8_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize_command = sub.add_parser("quantize")
    quantize_command.add_argument("source", type=Path)
    quantize_command.add_argument("out", type=Path)
    quantize_command.add_argument("--scheme", choices=tuple(PRESETS), required=True)
    quantize_command.add_argument("--ignore", action="append", default=[],
                                  help="a linear layer to leave unquantized: its name, or re:REGEX")
    for command in (quantize_command, *check_commands(sub, "checkpoint")):
        command.add_argument("--trust-remote-code", action="store_true")
    return serve(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
