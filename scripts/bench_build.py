"""Benchmark: a full `quantforge build` of the demo targets against llama.cpp's converter and quantizer run by
hand on the same model (same converter script, same libllama), and the ratio of wall times.

    .venv/bin/python scripts/bench_build.py [--types Q8_0,Q4_K_M,...]

quantforge does more than the hand-run tools: it verifies and evaluates every file against the source model
(the demo's settings: 8 windows of 512 tokens), hashes outputs and publishes them; the breakdown shows where
its time goes, and the second ratio leaves those checks out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def by_hand(source: Path, types: list[str], tmp: Path) -> float:
    import llama_cpp

    from quantforge.gguf_types import GGUF_TYPES
    from quantforge.toolchains.llamacpp import provision_converter

    converter = provision_converter()
    started = time.perf_counter()
    f16 = tmp / "model-f16.gguf"
    subprocess.run([sys.executable, str(converter.script), str(source), "--outfile", str(f16), "--outtype", "auto"],
                   check=True, capture_output=True, cwd=converter.root)
    for t in types:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, GGUF_TYPES[t])
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp / f"model-{t}.gguf").encode(),
                                            ctypes.byref(params))
        assert rc == 0, t
    return time.perf_counter() - started


def with_quantforge(source: Path, types: list[str], tmp: Path) -> tuple[float, dict]:
    targets = tmp / "bench.yaml"
    targets.write_text(f"defaults:\n  publish: {{to: 'dir:./out'}}\nmodels:\n  - name: bench\n    source: {source}\n"
                       f"    formats: {{gguf: {{types: [{', '.join(types)}]}}}}\n"
                       "    evaluation: {ctx: 512, chunks: 8, max_ppl_increase: {gguf: 1.0}}\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir",
                           str(tmp / "work"), "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"quantforge build failed:\n{proc.stderr}")
    return seconds, json.loads(proc.stdout)


def rebuild(tmp: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantforge.cli", "build", str(tmp / "bench.yaml"), "--work-dir",
                    str(tmp / "work"), "--json"], capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="Q8_0,Q4_K_M,Q5_K_M,Q6_K,Q4_0,F16")
    parser.add_argument("--source", type=Path, default=REPO / "demo" / "SmolLM2-135M-Instruct")
    args = parser.parse_args()
    types = args.types.split(",")
    from prepare_smollm2 import prepare

    source = prepare(args.source)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        hand = by_hand(source, types, Path(a))
        qf, report = with_quantforge(source, types, Path(b))
        again = rebuild(Path(b))
    by_kind: dict[str, float] = {}
    for step in report["steps"]:
        kind = step["kind"]
        by_kind[kind] = by_kind.get(kind, 0.0) + step.get("seconds", 0.0)
    print(f"model: {source.name}, types: {', '.join(types)}")
    print(f"by hand (converter + llama_model_quantize): {hand:7.1f} s")
    print(f"quantforge build (fresh work dir):          {qf:7.1f} s")
    for kind, seconds in sorted(by_kind.items()):
        print(f"    {kind:<16} {seconds:6.1f} s")
    print(f"    {'overhead':<16} {qf - sum(by_kind.values()):6.1f} s (start-up, planning, hashing, report)")
    print(f"ratio quantforge / by hand:                 {qf / hand:7.2f}")
    checks = ("gguf.verify", "gguf.evaluate", "eval.tokens", "eval.reference", "gate")
    without_checks = qf - sum(by_kind.get(k, 0.0) for k in checks)
    print(f"ratio without the checks ({', '.join(checks)}): {without_checks / hand:.2f}")
    print(f"rebuild with nothing changed:               {again:7.2f} s")


if __name__ == "__main__":
    main()
