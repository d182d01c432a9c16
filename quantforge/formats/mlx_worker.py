"""Child process for mlx-lm: the only module that imports mlx.

    python -m quantforge.formats.mlx_worker --result FILE convert SRC OUT --bits B --group-size G --dtype D
                                                         [--recipe mixed_3_6] [--trust-remote-code]
    python -m quantforge.formats.mlx_worker --result FILE generate DIR --prompt TEXT [--tokens N]
    python -m quantforge.formats.mlx_worker --result FILE evaluate DIR --windows NPY --reference NPZ [--sample JSON]

Output (mlx-lm prints with print()) goes to the step's log; the outcome is JSON in --result. On a CPU the model
computes in float32: MLX's CPU backend runs bfloat16 about eight times slower, and the weights it reads are the
same either way (the scales widen exactly).
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

from quantforge.toolchains.worker import check_commands, report_progress, serve

# Copied from the source as they are, over what mlx-lm re-saves: what a consumer gets is the source's tokenizer
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
# transformers 5 writes these under `rope_parameters`; mlx-lm's older model files read them at the top level
# only (llama: `rope_theta`, default 10000), so without a copy there a model loads with the wrong positions
ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def patch_rope(config: dict[str, Any]) -> list[str]:
    """Copy `rope_parameters` into the top-level keys mlx-lm reads, where absent (in a text_config too); the
    keys written, as paths."""
    written = []
    for prefix, section in (("", config), ("text_config.", config.get("text_config"))):
        params = section.get("rope_parameters") if isinstance(section, dict) else None
        if not isinstance(params, dict):
            continue
        for key in ROPE_KEYS:
            if key in params and key not in section:
                section[key] = params[key]
                written.append(prefix + key)
        scaling = {k: v for k, v in params.items() if k not in ROPE_KEYS}
        if scaling.get("rope_type", "default") != "default" and not section.get("rope_scaling"):
            section["rope_scaling"] = scaling
            written.append(prefix + "rope_scaling")
    return written


def convert(args: argparse.Namespace) -> dict[str, Any]:
    import mlx_lm

    config = json.loads((args.source / "config.json").read_text())
    model_type = config.get("model_type")
    if not supported(model_type):
        return {"ok": False, "unsupported": model_type,
                "error": f"mlx-lm has no implementation of model_type {model_type!r}"}
    started = time.perf_counter()
    mlx_lm.convert(hf_path=str(args.source), mlx_path=str(args.out), quantize=True, q_bits=args.bits,
                   q_group_size=args.group_size, dtype=args.dtype, quant_predicate=args.recipe,
                   trust_remote_code=args.trust_remote_code)
    seconds = time.perf_counter() - started
    out_config_file = args.out / "config.json"
    out_config = json.loads(out_config_file.read_text())
    rope = patch_rope(out_config)
    out_config_file.write_text(json.dumps(out_config, indent=4, sort_keys=True) + "\n")
    for name in SOURCE_FILES:
        if (args.source / name).is_file():
            shutil.copyfile(args.source / name, args.out / name)
    (args.out / "README.md").unlink(missing_ok=True)  # mlx-lm's stub; quantforge writes the card
    return {"ok": True, "convert_seconds": round(seconds, 2), "rope_patched": rope,
            "architecture": model_type, **layers(args.out, args.group_size)}


def supported(model_type: str | None) -> bool:
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type) if model_type else None
    return bool(name) and importlib.util.find_spec(f"mlx_lm.models.{name}") is not None


def layers(folder: Path, group_size: int) -> dict[str, Any]:
    """Which weight matrices mlx-lm quantized (they have scales) and which it left as they were, with their input
    sizes: it skips, without a word, a layer whose input size the group size does not divide."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "numpy") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    quantized = {name[:-len(".scales")]: shape[-1] * group_size for name, shape in shapes.items()
                 if name.endswith(".scales")}
    plain = {name[:-len(".weight")]: shape[-1] for name, shape in shapes.items()
             if name.endswith(".weight") and len(shape) == 2 and name[:-len(".weight")] not in quantized}
    return {"quantized_layers": len(quantized), "unquantized_layers": dict(sorted(plain.items())),
            "input_sizes": sorted({*quantized.values(), *plain.values()}),
            "weight_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def _load(folder: Path, trust_remote_code: bool):
    """mlx-lm's own loader, as `mlx_lm.generate --model DIR` and LM Studio's MLX engine use it."""
    import mlx.core as mx
    import mlx_lm

    started = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(folder), tokenizer_config={"trust_remote_code": trust_remote_code},
                                   trust_remote_code=trust_remote_code)
    compute = "as stored"
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
        compute = "float32"
    return model, tokenizer, {"load_seconds": round(time.perf_counter() - started, 2), "compute_dtype": compute,
                              "device": "cpu" if mx.default_device() == mx.cpu else "gpu"}


def generate(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer, info = _load(args.checkpoint, args.trust_remote_code)
    generated: list[int] = []
    started = time.perf_counter()
    for response in mlx_lm.stream_generate(model, tokenizer, args.prompt, max_tokens=args.tokens,
                                           sampler=make_sampler(temp=0.0)):
        if not bool(mx.isfinite(response.logprobs).all()):
            return {"ok": False, "error": f"non-finite logits after {len(generated)} generated tokens"}
        if response.finish_reason != "stop":  # "stop": the end-of-sequence token, which is not text
            generated.append(int(response.token))
    seconds = time.perf_counter() - started
    return {"ok": True, "prompt_tokens": response.prompt_tokens, "generated_ids": generated,
            "generated_text": tokenizer.decode(generated), **info,
            "tokens_per_second": round(len(generated) / seconds, 2) if seconds else None}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the folder on the harness's windows (the same token ids the source model saw)."""
    import mlx.core as mx

    from quantforge import metrics
    from quantforge.chat_template import has_chat_template

    windows = np.load(args.windows)
    reference = metrics.Reference.load(args.reference)
    model, tokenizer, info = _load(args.checkpoint, args.trust_remote_code)
    comparison = metrics.Comparison([], [], [])
    started = time.perf_counter()
    for i, window in enumerate(windows):
        logits = model(mx.array(window.astype(np.int32))[None])[0].astype(mx.float32)
        mx.eval(logits)  # numpy's conversion of a lazy array is far slower than evaluating it first
        comparison.add_window(np.array(logits), window, reference)
        report_progress(f"window {i + 1}/{len(windows)}")
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"ok": True, **metrics.summarize(comparison, reference), **info,
                              "seconds": round(seconds, 3), "tokens_per_second": round(windows.size / seconds, 1)}
    if args.sample:
        result["tokenizer"] = metrics.sample_parity(
            args.sample, lambda text: tokenizer.encode(text, add_special_tokens=False), lambda t: tokenizer.decode([t]))
    result["chat_template"] = has_chat_template(args.checkpoint)
    return result


COMMANDS = {"convert": convert, "generate": generate, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("source", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--bits", type=int, required=True)
    c.add_argument("--group-size", type=int, required=True)
    c.add_argument("--dtype", required=True)
    c.add_argument("--recipe")
    c.add_argument("--trust-remote-code", action="store_true")
    for p in check_commands(sub, "checkpoint"):
        p.add_argument("--trust-remote-code", action="store_true")
    return serve(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
