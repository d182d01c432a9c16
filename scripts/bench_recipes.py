"""Benchmark: quality per byte of GGUF recipes on SmolLM2-135M-Instruct (issue 21) — the stock frontier (Q3_K_M …
Q8_0), bartowski's `_L` variants, and searched variants at the sizes of Q3_K_M, Q4_K_M and Q5_K_M, all with one
importance matrix, measured on an evaluation text from another domain than the calibration text.

    .venv/bin/python scripts/bench_recipes.py [--work-dir DIR] [--chunks N] [--ctx N]

Two builds in one work dir: the stock files and `_L` variants first (their sizes set the budgets), then the
searched variants (the stock steps are reused). The evaluation text is the package descriptions (README text:
prose, Markdown and code) of the packages installed in this environment, written to a file the targets name; the
calibration text is quantforge's default. Nothing of it is shipped or downloaded.

Goals (issue 21): at Q4_K_M's size, mean KLD at least 10% below Q4_K_M; at Q3_K_M's, 15% below Q3_K_M; search
cost at most 3 quantize+evaluate runs per tensor group.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

STOCK = ["Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
BUILTIN_L = ["Q3_K_XL", "Q4_K_L", "Q5_K_L", "Q6_K_L"]
SEARCHED = {"Q3_K_X": "Q3_K_M", "Q4_K_X": "Q4_K_M", "Q5_K_X": "Q5_K_M"}  # name -> the stock file whose size it gets
GOALS = {"Q3_K_X": 0.15, "Q4_K_X": 0.10}


def evaluation_text(path: Path, chars: int = 400_000) -> Path:
    """Package descriptions from this environment's metadata, sorted by name: another domain than Python's
    documentation topics, and not shipped by quantforge."""
    parts = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        if len(body) > 2000:
            parts.append(body.strip())
    path.write_text("\n\n".join(parts)[:chars], encoding="utf-8")
    return path


def build(targets: Path, work: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir", str(work),
                           "--no-gate", "--json"], capture_output=True, text=True)
    if not proc.stdout.strip():
        sys.exit(f"quantforge build failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    if not report["ok"]:
        sys.exit(f"quantforge build failed: {json.dumps(report.get('error'))}\n{proc.stderr[-3000:]}")
    return report, time.perf_counter() - started


def targets_text(source: Path, text: Path, types: list[str], variants: dict[str, int], ctx: int, chunks: int) -> str:
    lines = ["defaults:",
             "  publish: {to: 'dir:./out', namespace: bench}",
             f"  evaluation: {{dataset: 'file:{text}', ctx: {ctx}, chunks: {chunks}}}",
             "models:",
             "  - name: smollm2",
             f"    source: {source}",
             "    formats:",
             "      gguf:",
             "        imatrix: true",
             f"        types: [{', '.join(types)}]"]
    if variants:
        lines.append("        variants:")
        lines += [f"          {name}: {{budget: {{size: {size}}}}}" for name, size in variants.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=REPO / "demo" / "bench-recipes")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()

    from prepare_smollm2 import prepare

    source = prepare(REPO / "demo" / "SmolLM2-135M-Instruct")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    text = evaluation_text(args.work_dir / "evaluation.txt")
    targets = args.work_dir / "bench.yaml"
    work = args.work_dir / "work"
    targets.write_text(targets_text(source, text, STOCK + BUILTIN_L, {}, args.ctx, args.chunks))
    first, first_wall = build(targets, work)
    sizes = {s["type"]: s["data"]["size"] for s in first["steps"] if s["kind"] == "gguf.quantize"}
    targets.write_text(targets_text(source, text, STOCK + BUILTIN_L, {n: sizes[b] for n, b in SEARCHED.items()},
                                    args.ctx, args.chunks))
    second, second_wall = build(targets, work)

    steps = {s["label"]: s for s in second["steps"]}
    sensitivity = steps["smollm2/gguf:sensitivity"]["data"]
    source_ppl = next(s["data"]["ppl"] for s in second["steps"] if s["kind"] == "eval.reference")
    rows = []
    for name in STOCK + BUILTIN_L + list(SEARCHED):
        quant = steps[f"smollm2/gguf/{name}:quantize"]["data"]
        ev = steps[f"smollm2/gguf/{name}:evaluate"]["data"]
        gate = steps[f"smollm2/gguf/{name}:gate"]["data"]
        search = (quant.get("recipe") or {}).get("search")
        rows.append({"name": name, "size": quant["size"], "bpw": quant["bits_per_weight"], "kld": ev["kld_mean"],
                     "p99": ev["kld_p99"], "top1": ev["top1"], "dppl": ev["delta_ppl"],
                     "frontier": (gate.get("frontier") or {}).get("frontier_kld"),
                     "passed": gate["gate"]["passed"], "search": search})
    by_name = {r["name"]: r for r in rows}
    print(f"SmolLM2-135M-Instruct, imatrix; evaluation: {args.chunks} x {args.ctx} tokens of {text.name} "
          f"(package descriptions); source PPL {source_ppl:.3f}; builds {first_wall:.0f} s + {second_wall:.0f} s")
    print("| file | size MB | bits/w | KLD mean | KLD p99 | top-1 | ΔPPL | vs stock at its size | search |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        versus = f"{r['kld'] / r['frontier'] - 1:+.1%} (frontier)" if r["frontier"] else "-"
        if r["name"] in SEARCHED:
            stock = by_name[SEARCHED[r["name"]]]
            versus = f"{r['kld'] / stock['kld'] - 1:+.1%} vs {stock['name']}"
        search = (f"{r['search']['runs']} runs ({sensitivity['seconds']:.0f} s, once), predicted KLD "
                  f"{r['search']['predicted_kld']:.4f}" if r["search"] else "")
        print(f"| {r['name']}{'' if r['passed'] else ' (fails gate)'} | {r['size'] / 1e6:.1f} | {r['bpw']:.2f} | "
              f"{r['kld']:.4f} | {r['p99']:.3f} | {r['top1']:.2%} | {r['dppl']:+.2%} | {versus} | {search} |")
    groups = len(sensitivity["groups"])
    print(f"search: {groups} tensor groups, {sensitivity['runs']} quantize+evaluate runs "
          f"({sensitivity['runs'] / groups:.2f} per group, goal <= 3), {sensitivity['seconds']:.0f} s")
    for name, goal in GOALS.items():
        gain = 1 - by_name[name]["kld"] / by_name[SEARCHED[name]]["kld"]
        print(f"goal {name}: KLD {gain:.1%} below {SEARCHED[name]} (goal >= {goal:.0%}): "
              f"{'met' if gain >= goal else 'missed'}")
    (args.work_dir / "result.json").write_text(json.dumps({"rows": rows, "sensitivity": sensitivity}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
