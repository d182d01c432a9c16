"""Benchmark: a full `quantforge build` of the demo targets against llama.cpp's converter and quantizer run by
hand on the same model (same converter script, same libllama), and the ratio of wall times.

    .venv/bin/python scripts/bench_build.py [--types Q8_0,Q4_K_M,...] [--chunks 8] [--repeat 1]

quantforge does more than the hand-run tools: it verifies and evaluates every file against the source model
(the demo's settings: 8 windows of 512 tokens), hashes outputs and publishes them; the breakdown shows where
its time goes, and the second ratio leaves those checks out. With --repeat N both sides run N times, alternating,
and the medians are compared (one run on a shared machine varies by about half a second).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
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


def with_quantforge(source: Path, types: list[str], tmp: Path, chunks: int) -> tuple[float, dict]:
    targets = tmp / "bench.yaml"
    targets.write_text(f"defaults:\n  publish: {{to: 'dir:./out'}}\nmodels:\n  - name: bench\n    source: {source}\n"
                       f"    formats: {{gguf: {{types: [{', '.join(types)}]}}}}\n"
                       f"    evaluation: {{ctx: 512, chunks: {chunks}, max_ppl_increase: {{gguf: 1.0}}}}\n")
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
    parser.add_argument("--chunks", type=int, default=8, help="evaluation windows of 512 tokens per artifact")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side; medians are compared")
    args = parser.parse_args()
    types = args.types.split(",")
    from prepare_smollm2 import prepare

    source = prepare(args.source.resolve())
    hands, runs, agains = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            hands.append(by_hand(source, types, Path(a)))
            runs.append(with_quantforge(source, types, Path(b), args.chunks))
            agains.append(rebuild(Path(b)))
    hand, again = statistics.median(hands), statistics.median(agains)
    qf, report = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median run, with its breakdown
    by_kind: dict[str, float] = {}
    for step in report["steps"]:
        by_kind[step["kind"]] = by_kind.get(step["kind"], 0.0) + step.get("seconds", 0.0)
    print(f"model: {source.name}, types: {', '.join(types)}; {args.repeat} run(s) each, medians")
    if args.repeat > 1:
        print(f"by hand, each run: {', '.join(f'{t:.1f}' for t in hands)} s; quantforge, each run: "
              f"{', '.join(f'{t:.1f}' for t, _ in runs)} s")
    print(f"by hand (converter + llama_model_quantize): {hand:7.1f} s")
    print(f"quantforge build (fresh work dir):          {qf:7.1f} s")
    for kind, seconds in sorted(by_kind.items()):
        print(f"    {kind:<16} {seconds:6.1f} s")
    print(f"    {'overhead':<16} {qf - sum(by_kind.values()):6.1f} s (start-up, planning, hashing, report)")
    print(f"ratio quantforge / by hand:                 {qf / hand:7.2f}")
    checks = ("gguf.verify", "gguf.evaluate", "eval.tokens", "eval.reference", "gate")
    without_checks = qf - sum(by_kind.get(k, 0.0) for k in checks)
    print(f"ratio without the checks ({', '.join(checks)}): {without_checks / hand:.2f}")
    # what the hand-run tools do too: convert and quantize, with quantforge's start-up, planning, hashing and
    # reading the source, but not publishing the files (copies into out/), which they do not do
    same_work = without_checks - by_kind.get("publish", 0.0)
    print(f"ratio without the checks and publishing:   {same_work / hand:7.2f}")
    print(f"rebuild with nothing changed:               {again:7.2f} s")


if __name__ == "__main__":
    main()
