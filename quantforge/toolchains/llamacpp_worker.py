"""Child process for libllama work; the only module that imports llama_cpp.

    python -m quantforge.toolchains.llamacpp_worker quantize IN OUT TYPE [--threads N] --result FILE
    python -m quantforge.toolchains.llamacpp_worker generate GGUF --prompt TEXT [--tokens N] --result FILE
    python -m quantforge.toolchains.llamacpp_worker evaluate GGUF --windows NPY --reference NPZ [--sample JSON]
                                                             --result FILE

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

from quantforge.gguf_types import GGUF_TYPES


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[args.type])
    params.nthread = args.threads
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(args.input).encode(), str(args.output).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - started
    if rc != 0:
        return {"ok": False, "error": f"llama_model_quantize returned {rc} (see the log)"}
    return {"ok": True, "seconds": round(seconds, 3)}


def generate(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(model_path=str(args.gguf), n_ctx=256, n_batch=256, logits_all=True, seed=0,
                n_threads=os.cpu_count(), verbose=True)
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
        generated.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
    gen_seconds = time.perf_counter() - started
    text = llm.detokenize(generated).decode("utf-8", errors="replace")
    return {
        "ok": True,
        "prompt_tokens": prompt_len,
        "generated_ids": generated,
        "generated_text": text,
        "n_vocab": llm.n_vocab(),
        "load_seconds": round(load_seconds, 3),
        "tokens_per_second": round(len(generated) / gen_seconds, 2) if gen_seconds > 0 else math.inf,
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the GGUF on the harness's windows (the same token ids the source model saw)."""
    import numpy as np
    from llama_cpp import Llama

    from quantforge import metrics

    windows = np.load(args.windows)
    reference = metrics.Reference.load(args.reference)
    ctx = int(windows.shape[1])
    llm = Llama(model_path=str(args.gguf), n_ctx=ctx, n_batch=min(ctx, 512), n_ubatch=min(ctx, 512),
                logits_all=True, n_threads=args.threads or os.cpu_count(), verbose=True)
    comparison = metrics.Comparison([], [], [])
    offset = 0
    started = time.perf_counter()
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        comparison.add_window(llm.scores[:ctx], window, reference, offset)
        offset += len(comparison.nll[-1])
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"ok": True, **metrics.summarize(comparison, reference),
                              "seconds": round(seconds, 3), "tokens_per_second": round(windows.size / seconds, 1)}
    if args.sample:
        sample = json.loads(args.sample.read_text())
        got = llm.tokenize(sample["text"].encode(), add_bos=False, special=False)

        def piece(token: int) -> str:
            return llm.detokenize([token]).decode("utf-8", errors="replace")

        result["tokenizer"] = metrics.tokenizer_parity(sample["ids"], got, piece)
    return result


COMMANDS = {"quantize": quantize, "generate": generate, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamacpp_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("input", type=Path)
    q.add_argument("output", type=Path)
    q.add_argument("type", choices=sorted(GGUF_TYPES))
    q.add_argument("--threads", type=int, default=0)
    g = sub.add_parser("generate")
    g.add_argument("gguf", type=Path)
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokens", type=int, default=8)
    e = sub.add_parser("evaluate")
    e.add_argument("gguf", type=Path)
    e.add_argument("--windows", type=Path, required=True)
    e.add_argument("--reference", type=Path, required=True)
    e.add_argument("--sample", type=Path)
    e.add_argument("--threads", type=int, default=0)
    for p in (q, g, e):
        p.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except Exception as exc:  # reported to the parent as data; the traceback goes to the log
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    args.result.write_text(json.dumps(result))
    sys.stderr.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
