"""Child process for GPTQModel and transformers work on quantized checkpoints; the only module that imports
gptqmodel.

    python -m quantforge.toolchains.gptqmodel_worker --result FILE quantize SRC OUT --method gptq|awq
                                                              --calibration NPY --config JSON --scratch DIR
                                                              [--trust-remote-code]
    python -m quantforge.toolchains.gptqmodel_worker --result FILE generate DIR --prompt TEXT [--tokens N]
                                                              [--trust-remote-code]
    python -m quantforge.toolchains.gptqmodel_worker --result FILE evaluate DIR --windows NPY --reference NPZ
                                                              [--sample JSON] [--trust-remote-code]

Output goes to the step's log; the outcome is JSON in --result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantforge.toolchains import transformers_checks
from quantforge.toolchains.device import cuda_available
from quantforge.toolchains.worker import check_commands, serve

# Copied from the source as they are: GPTQModel re-saves the tokenizer and "fixes" the generation config, but
# what a consumer gets should be the source's own.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
CONFIG_FILES = ("config.json", "quantize_config.json")
QUANT_LOG = "quant_log.csv"


def _device() -> str:
    return "cuda" if cuda_available() else "cpu"


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    device = _device()
    windows = np.load(args.calibration)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]
    config = QuantizeConfig(**json.loads(args.config), offload_to_disk_path=str(args.scratch / "offload"))
    # GPTQModel's default AWQ backend needs CUDA; its torch kernel packs the same GEMM layout on a CPU
    backend = BACKEND.AWQ_TORCH if args.method == "awq" and device != "cuda" else BACKEND.AUTO
    # fp16 on both devices: the checkpoint's scales and unquantized weights are fp16, which every consumer
    # reads (GPTQModel's AWQ packer refuses fp32); GPTQ's Hessian and solve run in fp32 regardless
    started = time.perf_counter()
    model = GPTQModel.load(str(args.source), config, dtype=torch.float16, device=device,
                           trust_remote_code=args.trust_remote_code)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.quantize(calibration, batch_size=1, backend=backend)
    quantize_seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(str(args.out))
    del model
    _tidy_checkpoint(args.source, args.out, args.scratch)
    return {"ok": True, "device": device, "dtype": "float16", "load_seconds": round(load_seconds, 2),
            "quantize_seconds": round(quantize_seconds, 2), "calibration_tokens": int(windows.size)}


def _tidy_checkpoint(source: Path, out: Path, scratch: Path) -> None:
    """Make the saved folder what a consumer should download: the source's tokenizer and generation config,
    no local paths in the configs, and GPTQModel's per-layer loss table kept beside it rather than in it."""
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for name in CONFIG_FILES:
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for meta in (data.get("meta"), data.get("quantization_config", {}).get("meta")):
            if isinstance(meta, dict):
                meta.pop("offload_to_disk_path", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if (out / QUANT_LOG).is_file():
        shutil.move(out / QUANT_LOG, scratch / QUANT_LOG)


def _load(checkpoint: Path, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), device_map=_device(),
                                                 trust_remote_code=trust_remote_code).eval()
    return model, time.perf_counter() - started


def _kernels(model) -> list[str]:
    """The quantized-linear classes transformers chose (which GPTQModel kernel serves this checkpoint)."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


def generate(args: argparse.Namespace) -> dict[str, Any]:
    model, load_seconds = _load(args.checkpoint, args.trust_remote_code)
    kernels = _kernels(model)
    if not kernels:
        return {"ok": False, "error": "transformers loaded no quantized layer (quantization_config ignored?)"}
    result = transformers_checks.generate(model, args.checkpoint, args.prompt, args.tokens, args.trust_remote_code)
    return {**result, "kernels": kernels, "load_seconds": round(load_seconds, 2)}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the checkpoint on the harness's windows (the same token ids the source model saw)."""
    model, _ = _load(args.checkpoint, args.trust_remote_code)
    return transformers_checks.evaluate(model, args.checkpoint, args.windows, args.reference, args.sample,
                                        args.trust_remote_code)


COMMANDS = {"quantize": quantize, "generate": generate, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptqmodel_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("source", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("--method", choices=("gptq", "awq"), required=True)
    q.add_argument("--calibration", type=Path, required=True)
    q.add_argument("--config", required=True, help="GPTQModel QuantizeConfig arguments (JSON)")
    q.add_argument("--scratch", type=Path, required=True)
    q.add_argument("--trust-remote-code", action="store_true")
    for p in check_commands(sub, "checkpoint"):
        p.add_argument("--trust-remote-code", action="store_true")
    return serve(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
