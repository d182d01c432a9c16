"""Benchmark: calibrated quantization of SmolLM2-135M-Instruct — GPTQ 4-bit and AWQ 4-bit (group size 64) through
GPTQModel, and GGUF Q4_K_M with and without an importance matrix — each measured by the evaluation harness on
the same windows (8 x 512 tokens of the built-in text), with wall times.

    .venv/bin/python scripts/bench_calibration.py [--samples N --seq-len N] [--gptq-samples N --gptq-seq-len N]
                                                  [--work-dir DIR] [--only gguf|gptq|awq]

The importance matrix uses `--samples x --seq-len` calibration tokens (default 32 x 512). GPTQ and AWQ default to
fewer on a CPU (8 x 256): GPTQModel's CPU path needs about 30 s (GPTQ) and 3 min (AWQ) per decoder layer at 32 x
512; on a GPU use the full amount. The time ratio reported for GPTQ/AWQ is the quantize step's wall time over
GPTQModel's own load + quantize time inside it (what quantforge adds: the process, the shape check, the tidy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def main() -> int:
    import torch

    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gptq-samples", type=int, default=32 if gpu else 8)
    parser.add_argument("--gptq-seq-len", type=int, default=512 if gpu else 256)
    parser.add_argument("--work-dir", type=Path, default=REPO / "demo" / "bench-calibration")
    parser.add_argument("--only", choices=("gguf", "gptq", "awq"))
    args = parser.parse_args()

    from prepare_smollm2 import prepare

    source = prepare(REPO / "demo" / "SmolLM2-135M-Instruct")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    targets = args.work_dir / "bench.yaml"
    override = f"samples: {args.gptq_samples}, seq_len: {args.gptq_seq_len}"
    formats = {
        "gguf": "{types: [Q4_K_M]}",
        "gptq": f"{{bits: 4, group_size: 64, {override}}}",
        "awq": f"{{bits: 4, group_size: 64, {override}}}",
    }
    if args.only:
        formats = {args.only: formats[args.only]}
    lines = ["defaults:",
             "  publish: {to: 'dir:./out', namespace: bench}",
             f"  calibration: {{dataset: builtin, samples: {args.samples}, seq_len: {args.seq_len}}}",
             "  evaluation: {ctx: 512, chunks: 8, max_ppl_increase: {gguf: 5.0, gptq: 5.0, awq: 5.0}}",
             "models:",
             "  - name: smollm2",
             f"    source: {source}",
             "    formats:"]
    lines += [f"      {name}: {spec}" for name, spec in formats.items()]
    if "gguf" in formats:
        lines += ["  - name: smollm2-imatrix",
                  f"    source: {source}",
                  "    formats:",
                  "      gguf: {types: [Q4_K_M], imatrix: true}"]
    targets.write_text("\n".join(lines) + "\n")

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir",
                           str(args.work_dir / "work"), "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if not proc.stdout.strip():
        sys.exit(f"quantforge build failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    steps = {s["label"]: s for s in report["steps"]}
    for step in steps.values():  # a reused step reports 0 s: show how long it took when it was built
        if step["status"] == "reused":
            step["seconds"] = json.loads((Path(step["output_dir"]) / "manifest.json").read_text())["seconds"]

    print(f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if gpu else 'cpu'}; build wall time "
          f"{wall:.0f} s; calibration {args.samples}x{args.seq_len} (imatrix), "
          f"{args.gptq_samples}x{args.gptq_seq_len} (GPTQ/AWQ)")
    print(f"{'artifact':<28} {'PPL':>9} {'ΔPPL':>8} {'KLD':>7} {'top-1':>7} {'MB':>7} {'quantize s':>11} "
          f"{'ratio':>6} {'eval s':>7}")
    rows = [("smollm2/gguf/Q4_K_M", "Q4_K_M"), ("smollm2-imatrix/gguf/Q4_K_M", "Q4_K_M + imatrix"),
            ("smollm2/gptq", "GPTQ 4-bit g64"), ("smollm2/awq", "AWQ 4-bit g64")]
    for label, name in rows:
        quant = steps.get(f"{label}:quantize")
        if quant is None:
            continue
        evaluation = steps.get(f"{label}:evaluate", {}).get("data", {})
        q = quant.get("data", {})
        inner = q.get("quantize_seconds")
        tool_seconds = (q.get("load_seconds", 0) + inner) if "load_seconds" in q else None
        ratio = f"{quant['seconds'] / tool_seconds:.2f}" if tool_seconds else "-"
        if "imatrix" in label:
            imatrix = steps.get("smollm2-imatrix/gguf:imatrix", {})
            name += f" ({imatrix.get('seconds', 0):.0f} s matrix)"
        print(f"{name:<28} {evaluation.get('ppl', float('nan')):>9.3f} {evaluation.get('delta_ppl', 0):>+8.2%} "
              f"{evaluation.get('kld_mean', float('nan')):>7.4f} {evaluation.get('top1', 0):>7.2%} "
              f"{q.get('size', 0) / 1e6:>7.1f} {quant.get('seconds', 0):>11.1f} {ratio:>6} "
              f"{steps.get(f'{label}:evaluate', {}).get('seconds', 0):>7.1f}")
    source_ppl = next((s["data"]["ppl"] for s in report["steps"] if s["kind"] == "eval.reference"), None)
    print(f"source PPL {source_ppl}; failures: {[s['label'] for s in report['steps'] if s['status'] == 'failed']}")
    (args.work_dir / "result.json").write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
