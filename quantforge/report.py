"""The build report: JSON in the work dir (one per build, plus latest.json), and a Markdown summary for
GitHub Actions when $GITHUB_STEP_SUMMARY is set."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .engine import BuildReport
from .store import WorkDir, write_json_atomic


def save(report: BuildReport, work: WorkDir) -> Path:
    work.reports_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report.started))
    data = report.to_json()
    path = work.reports_dir / f"build-{stamp}-{os.getpid()}.json"
    write_json_atomic(path, data)
    write_json_atomic(work.reports_dir / "latest.json", data)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown(data))
    return path


def artifact_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per verified artifact: what a person wants to see after a build."""
    steps = {s["label"]: s for s in data["steps"]}
    rows = []
    for label, step in steps.items():
        if step["kind"] not in ("gguf.quantize", "gptq.quantize", "awq.quantize"):
            continue
        verify = steps.get(label.replace(":quantize", ":verify"), {})
        evaluate = steps.get(label.replace(":quantize", ":evaluate"), {}).get("data", {})
        gate = steps.get(label.replace(":quantize", ":gate"), {})
        d = step.get("data", {})
        rows.append({
            "artifact": label.removesuffix(":quantize"),
            "file": d.get("file") or d.get("dir"),
            "size_mb": round(d["size"] / 1e6, 1) if "size" in d else None,
            "bpw": d.get("bits_per_weight"),
            "fallbacks": len(d.get("fallbacks", [])),
            "verified": "yes" if verify.get("status") in ("built", "reused") else verify.get("status", step["status"]),
            "sample": verify.get("data", {}).get("generated_text"),
            "ppl": evaluate.get("ppl"),
            "ppl_err": evaluate.get("ppl_err"),
            "source_ppl": evaluate.get("source_ppl"),
            "delta_ppl": evaluate.get("delta_ppl"),
            "kld": evaluate.get("kld_mean"),
            "kld_p99": evaluate.get("kld_p99"),
            "top1": evaluate.get("top1"),
            "tokenizer": (evaluate.get("tokenizer") or {}).get("same"),
            "gate": _gate_status(gate),
        })
    return rows


def _gate_status(gate: dict[str, Any]) -> str:
    if not gate:
        return "-"
    if gate["status"] == "failed":
        return "FAILED"
    info = gate.get("data", {}).get("gate", {})
    if info and not info.get("enforced", True):
        return "not enforced" + (" (would fail)" if not info.get("passed") else "")
    return "pass" if gate["status"] in ("built", "reused") else gate["status"]


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def fmt_num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(data: dict[str, Any]) -> str:
    lines = [f"### quantforge build: {'ok' if data['ok'] else 'FAILED'} ({data['seconds']:.0f} s)", "",
             "| artifact | size MB | bits/weight | PPL | ΔPPL | KLD | top-1 | fallbacks | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in artifact_rows(data):
        lines.append(f"| {row['artifact']} | {row['size_mb']} | {row['bpw']} | {fmt_num(row['ppl'])} | "
                     f"{fmt_pct(row['delta_ppl'])} | {fmt_num(row['kld'], 4)} | {fmt_pct(row['top1'])[1:]} | "
                     f"{row['fallbacks']} | {row['gate']} |")
    for step in data["steps"]:
        if step["status"] == "failed":
            lines.append(f"\n**{step['label']} failed:** {step.get('error')} (log: `{step.get('log')}`)")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    lines += ["", f"Steps: {counts}", ""]
    return "\n".join(lines)
