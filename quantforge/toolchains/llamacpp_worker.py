"""Child process for libllama work; the only module that imports llama_cpp.

    python -m quantforge.toolchains.llamacpp_worker --result FILE quantize IN OUT TYPE [--threads N]
                                                                  [--imatrix NPZ --gguf-py DIR]
                                                                  [--kv-overrides JSON]
                                                                  [--output-tensor-type T] [--token-embedding-type T]
                                                                  [--tensor-type PATTERN=T ...]
    python -m quantforge.toolchains.llamacpp_worker --result FILE generate GGUF --prompt TEXT [--tokens N]
                                                                  [--threads N]
    python -m quantforge.toolchains.llamacpp_worker --result FILE evaluate GGUF --windows NPY --reference NPZ
                                                                  [--sample JSON] [--threads N]
    python -m quantforge.toolchains.llamacpp_worker --result FILE probe GGUF --windows NPY
                                                                  (--reference NPZ | --write-reference NPZ)

libllama logs to this process's stderr, which the parent points at the step's log file. The outcome is written
as JSON to --result, so the parent never parses free text for success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantforge.gguf_types import GGUF_TYPES
from quantforge.toolchains.worker import check_commands, serve

# every layer on the GPU when libllama was built with GPU support (a CPU-only build ignores it)
GPU_LAYERS = -1


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[args.type])
    params.nthread = args.threads
    # llama-quantize's --output-tensor-type, --token-embedding-type and --tensor-type, with the same precedence
    if args.output_tensor_type:
        params.output_tensor_type = ggml_type(args.output_tensor_type)
    if args.token_embedding_type:
        params.token_embedding_type = ggml_type(args.token_embedding_type)
    rules = tensor_override_array(args.tensor_type)  # kept alive until quantization returns
    if rules is not None:
        params.tt_overrides = ctypes.cast(rules[0], ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    used: dict[str, Any] | None = None
    if args.imatrix:
        entries, used = imatrix_entries(args.imatrix, args.gguf_py, args.input)
        # a NULL-name-terminated C array; `keep` holds the buffers alive until quantization returns
        array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        keep = []
        for i, (name, values) in enumerate(sorted(entries.items())):
            buffer = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), buffer))
            array[i].name = keep[-1][0]
            array[i].data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = buffer.size
        array[len(entries)].name = None
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    overrides: dict[str, Any] | None = None
    if args.kv_overrides is not None:
        overrides = dict(args.kv_overrides)
        if used is not None:
            # what llama-quantize records: the number of tensors the matrix weighted, known only after mapping
            given = overrides.setdefault(IMATRIX_ENTRIES_KEY, used["tensors"])
            if given != used["tensors"]:
                return {"ok": False, "error": f"{IMATRIX_ENTRIES_KEY} is {given}, but {used['tensors']} tensors "
                                              "were weighted by the importance matrix"}
        kv_array = kv_override_array(overrides)  # kept alive until quantization returns
        params.kv_overrides = ctypes.cast(kv_array, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(args.input).encode(), str(args.output).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - started
    if rc != 0:
        return {"ok": False, "error": f"llama_model_quantize returned {rc} (see the log)"}
    result: dict[str, Any] = {"ok": True, "seconds": round(seconds, 3), "imatrix": used}
    if overrides is not None:
        result["kv_overrides"] = overrides
    return result


IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"
GGML_TYPE_BF16 = 30  # ggml.h's enum value; llama_cpp exports the other types' but not this one


def ggml_type(name: str) -> int:
    """A ggml tensor type's enum value, by its name (Q8_0, q6_k, BF16)."""
    import llama_cpp

    value = GGML_TYPE_BF16 if name.upper() == "BF16" else getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if not isinstance(value, int) or name.upper() == "COUNT":
        raise ValueError(f"unknown ggml tensor type {name!r}")
    return value


def tensor_override_array(rules: list[str] | None) -> tuple[Any, list[bytes]] | None:
    """["PATTERN=TYPE", ...] -> the C array llama_model_quantize_params.tt_overrides points at, ended by a NULL
    pattern (as llama-quantize builds it), and the pattern buffers it points into. The type follows the last '='."""
    if not rules:
        return None
    import llama_cpp

    array = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
    patterns = []
    for entry, rule in zip(array, rules, strict=False):
        pattern, _, qtype = rule.rpartition("=")
        patterns.append(pattern.encode())
        entry.pattern, entry.type = patterns[-1], ggml_type(qtype)
    array[len(rules)].pattern, array[len(rules)].type = None, llama_cpp.GGML_TYPE_COUNT
    return array, patterns


def kv_override_array(overrides: dict[str, Any]) -> Any:
    """{key: str | int | float | bool} -> the C array llama_model_quantize_params.kv_overrides points at: one
    llama_model_kv_override per key, ended by an entry whose key is empty (as llama-quantize builds it). The
    parent has checked sizes and ranges (llamacpp.check_kv_overrides)."""
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()  # zeroed: the last key is ""
    str_size = llama_cpp.llama_model_kv_override_value.val_str.size  # 128 bytes
    for entry, (key, value) in zip(array, overrides.items(), strict=False):
        entry.key = key.encode()
        if isinstance(value, bool):  # before int: bool is an int in Python
            entry.tag, entry.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            entry.tag, entry.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            entry.tag, entry.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        else:
            encoded = str(value).encode()
            if len(encoded) >= str_size:  # the C side needs a NUL within the buffer
                raise ValueError(f"{key}: value longer than {str_size - 1} bytes")
            entry.tag, entry.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, encoded
    return array


def imatrix_entries(npz: Path, gguf_py: Path, gguf_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An importance matrix under Hugging Face module names -> {GGUF tensor name: values}, through the name map
    of the converter that wrote `gguf_file`; and a record of what was mapped."""
    sys.path.insert(0, str(gguf_py))  # the converter's gguf-py, which is newer than PyPI's
    import gguf

    from quantforge.toolchains.gguf_header import read_header

    header = read_header(gguf_file)
    arch_name = header.metadata["general.architecture"]
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ValueError(f"the converter's gguf-py does not know architecture {arch_name!r}")
    name_map = gguf.get_tensor_name_map(arch, int(header.metadata[f"{arch_name}.block_count"]))
    columns = {t.name: t.shape[0] for t in header.tensors}  # ne[0]: the input size of a weight matrix
    entries: dict[str, Any] = {}
    unmapped: list[str] = []
    with np.load(npz) as matrix:
        for hf_name in matrix.files:
            name = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
            values = matrix[hf_name]
            if name is None or columns.get(name) != values.size:
                unmapped.append(hf_name)
                continue
            entries[name] = values
    if not entries:
        raise ValueError(f"no importance-matrix entry maps to a tensor of {gguf_file.name} (unmapped: "
                         f"{', '.join(unmapped[:5])})")
    print(f"quantforge: importance matrix: {len(entries)} tensors, {len(unmapped)} unmapped", file=sys.stderr)
    return entries, {"tensors": len(entries), "unmapped": unmapped}


def generate(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    started = time.perf_counter()
    threads = args.threads or os.cpu_count()
    llm = Llama(model_path=str(args.gguf), n_ctx=256, n_batch=256, logits_all=True, seed=0, n_threads=threads,
                n_threads_batch=threads, n_gpu_layers=GPU_LAYERS, verbose=True)
    load_seconds = time.perf_counter() - started
    tokens = llm.tokenize(args.prompt.encode(), add_bos=True, special=False)
    prompt_len = len(tokens)
    llm.reset()
    llm.eval(tokens)
    generated: list[int] = []
    started = time.perf_counter()
    for _ in range(args.tokens):
        logits = llm.scores[llm.n_tokens - 1]
        if not np.all(np.isfinite(logits)):
            return {"ok": False, "error": f"non-finite logits after {len(generated)} generated tokens"}
        token = int(np.argmax(logits))
        if token == llm.token_eos():  # the end of the answer, not part of it: an EOS first means no output
            break
        generated.append(token)
        llm.eval([token])
    gen_seconds = time.perf_counter() - started
    text = llm.detokenize(generated).decode("utf-8", errors="replace")
    return {
        "ok": True,
        "prompt_tokens": prompt_len,
        "generated_ids": generated,
        "generated_text": text,
        "n_vocab": llm.n_vocab(),
        "threads": [llm.n_threads, llm.n_threads_batch],  # one token at a time, and batches
        "load_seconds": round(load_seconds, 3),
        "tokens_per_second": round(len(generated) / gen_seconds, 2) if gen_seconds > 0 else math.inf,
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the GGUF on the harness's windows (the same token ids the source model saw)."""
    from llama_cpp import Llama

    from quantforge import metrics

    windows = np.load(args.windows)
    reference = metrics.Reference.load(args.reference)
    ctx = int(windows.shape[1])
    threads = args.threads or os.cpu_count()  # the prompt's batches too: llama-cpp-python's default is every core
    llm = Llama(model_path=str(args.gguf), n_ctx=ctx, n_batch=min(ctx, 512), n_ubatch=min(ctx, 512),
                logits_all=True, n_threads=threads, n_threads_batch=threads, n_gpu_layers=GPU_LAYERS, verbose=True)
    comparison = metrics.Comparison([], [], [])
    started = time.perf_counter()
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        comparison.add_window(llm.scores[:ctx], window, reference)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"ok": True, **metrics.summarize(comparison, reference),
                              "threads": [llm.n_threads, llm.n_threads_batch],
                              "seconds": round(seconds, 3), "tokens_per_second": round(windows.size / seconds, 1)}
    if args.sample:
        result["tokenizer"] = metrics.sample_parity(
            args.sample, lambda text: llm.tokenize(text.encode(), add_bos=False, special=False),
            lambda t: llm.detokenize([t]).decode("utf-8", errors="replace"))
    return result


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """A search's measurement: the GGUF's mean KL divergence from `--reference` on the windows, unrounded (a
    probe's difference from the baseline may be 1e-7); with `--write-reference`, save the GGUF's own distribution
    there instead (the search's reference is the full-precision GGUF)."""
    from llama_cpp import Llama

    from quantforge import metrics

    windows = np.load(args.windows)
    ctx = int(windows.shape[1])
    threads = args.threads or os.cpu_count()
    llm = Llama(model_path=str(args.gguf), n_ctx=ctx, n_batch=min(ctx, 512), n_ubatch=min(ctx, 512),
                logits_all=True, n_threads=threads, n_threads_batch=threads, n_gpu_layers=GPU_LAYERS, verbose=True)
    started = time.perf_counter()
    if args.write_reference:
        parts = []
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            parts.append(metrics.score_window(llm.scores[:ctx], window))
        metrics.concat(parts).save(args.write_reference)
        return {"ok": True, "seconds": round(time.perf_counter() - started, 3)}
    reference = metrics.Reference.load(args.reference)
    comparison = metrics.Comparison([], [], [])
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        comparison.add_window(llm.scores[:ctx], window, reference)
    kld = np.concatenate(comparison.kld)
    return {"ok": True, "kld_mean": float(kld.mean()), "positions": int(kld.size),
            "seconds": round(time.perf_counter() - started, 3)}


COMMANDS = {"quantize": quantize, "generate": generate, "evaluate": evaluate, "probe": probe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamacpp_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("input", type=Path)
    q.add_argument("output", type=Path)
    q.add_argument("type", choices=sorted(GGUF_TYPES))
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--imatrix", type=Path)
    q.add_argument("--gguf-py", type=Path)
    q.add_argument("--kv-overrides", type=json.loads, help="a JSON object {key: str | int | float | bool}")
    q.add_argument("--output-tensor-type")
    q.add_argument("--token-embedding-type")
    q.add_argument("--tensor-type", action="append", help="PATTERN=TYPE, as llama-quantize takes it; repeatable")
    p = sub.add_parser("probe")
    p.add_argument("gguf", type=Path)
    p.add_argument("--windows", type=Path, required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--reference", type=Path)
    target.add_argument("--write-reference", type=Path)
    g, e = check_commands(sub, "gguf")
    for command in (g, e, p):
        command.add_argument("--threads", type=int, default=0)
    return serve(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
