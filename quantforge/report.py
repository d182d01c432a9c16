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
        if step["kind"] != "gguf.quantize":
            continue
        verify = steps.get(label.replace(":quantize", ":verify"), {})
        d = step.get("data", {})
        rows.append({
            "artifact": label.removesuffix(":quantize"),
            "file": d.get("file"),
            "size_mb": round(d["size"] / 1e6, 1) if "size" in d else None,
            "bpw": d.get("bits_per_weight"),
            "fallbacks": len(d.get("fallbacks", [])),
            "status": "yes" if verify.get("status") in ("built", "reused") else verify.get("status", step["status"]),
            "sample": verify.get("data", {}).get("generated_text"),
        })
    return rows


def markdown(data: dict[str, Any]) -> str:
    lines = [f"### quantforge build: {'ok' if data['ok'] else 'FAILED'} ({data['seconds']:.0f} s)", "",
             "| artifact | size MB | bits/weight | fallbacks | verified |", "|---|---:|---:|---:|---|"]
    for row in artifact_rows(data):
        lines.append(f"| {row['artifact']} | {row['size_mb']} | {row['bpw']} | {row['fallbacks']} | {row['status']} |")
    for step in data["steps"]:
        if step["status"] == "failed":
            lines.append(f"\n**{step['label']} failed:** {step.get('error')} (log: `{step.get('log')}`)")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    lines += ["", f"Steps: {counts}", ""]
    return "\n".join(lines)
