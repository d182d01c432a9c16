"""Benchmark: the harness's GGUF evaluation (a `gguf.evaluate` step: child process, model load, metrics)
against the llama.cpp runtime driven directly on the same windows (load, eval each window with logits, nothing
else), and the ratio of their throughputs (goal >= 0.9).

    .venv/bin/python scripts/bench_eval.py [--gguf FILE] [--ctx 512] [--chunks 8]

Without --gguf it builds the demo's Q8_0 GGUF first (cached in demo/work).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def direct(gguf: Path, windows: np.ndarray) -> float:
    """tokens/s of llama.cpp alone, timed from before the model load, like the harness."""
    from llama_cpp import Llama

    ctx = windows.shape[1]
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=ctx, n_batch=min(ctx, 512), n_ubatch=min(ctx, 512), logits_all=True,
                n_threads=os.cpu_count(), verbose=False)
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        _ = llm.scores[:ctx]
    return windows.size / (time.perf_counter() - started)


def harness(gguf: Path, windows_file: Path, reference: Path, sample: Path, tmp: Path, n_tokens: int) -> float:
    from quantforge.toolchains import llamacpp

    started = time.perf_counter()
    llamacpp.evaluate(gguf, windows_file, reference, sample, tmp / "eval.log", tmp)
    return n_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    from prepare_smollm2 import prepare

    source = prepare(REPO / "demo" / "SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        targets = tmp / "bench.yaml"
        targets.write_text(f"defaults:\n  publish: {{to: 'dir:{tmp}/out'}}\nmodels:\n  - name: bench\n"
                           f"    source: {source}\n    formats: {{gguf: {{types: [Q8_0]}}}}\n"
                           f"    evaluation: {{ctx: {args.ctx}, chunks: {args.chunks}}}\n")
        proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir",
                               str(REPO / "demo" / "bench-work"), "--json", "--no-gate"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
        tokens_dir = Path(steps["bench:eval-tokens"]["output_dir"])
        ref_dir = Path(steps["bench:eval-reference"]["output_dir"])
        gguf = args.gguf or Path(steps["bench/gguf/Q8_0:quantize"]["output_dir"]) / "bench-Q8_0.gguf"
        windows = np.load(tokens_dir / "windows.npy")
        runs_direct = [direct(gguf, windows) for _ in range(2)]
        runs_harness = [harness(gguf, tokens_dir / "windows.npy", ref_dir / "reference.npz",
                                tokens_dir / "tokenizer_sample.json", tmp, windows.size) for _ in range(2)]
    d, h = max(runs_direct), max(runs_harness)
    print(f"windows: {windows.shape[0]} x {windows.shape[1]} tokens, GGUF {gguf.name}")
    print(f"llama.cpp runtime alone:   {d:8.1f} tokens/s (best of {len(runs_direct)})")
    print(f"quantforge harness:        {h:8.1f} tokens/s (best of {len(runs_harness)}; PPL, KLD, top-1, tokenizer)")
    print(f"ratio harness / direct:    {h / d:8.2f}")


if __name__ == "__main__":
    main()
