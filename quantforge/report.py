"""The build report: JSON in the work dir (one per build, plus latest.json), and a Markdown summary for
GitHub Actions when $GITHUB_STEP_SUMMARY is set; and `quantforge report merge`, which joins a nightly's legs'
reports into one summary."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .core.engine import BuildReport
from .figures import format_num, format_pct
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
    """One row per built artifact: what a person wants to see after a build. An artifact's steps are found by
    the model, format and type each step carries, and by their stage (artifact, verify, evaluate, gate)."""
    stages: dict[tuple, dict[str, dict[str, Any]]] = {}
    for step in data["steps"]:
        if step.get("stage") in ("artifact", "verify", "evaluate", "gate"):
            which = (step.get("model"), step.get("format"), step.get("type"))
            stages.setdefault(which, {})[step["stage"]] = step
    rows = []
    for (model, fmt, qtype), steps in stages.items():
        step = steps.get("artifact")
        if step is None or step["status"] == "not-needed":  # up to date by its repo's record: nothing to show
            continue
        verify = steps.get("verify", {})
        evaluate = steps.get("evaluate", {}).get("data", {})
        gate = steps.get("gate", {})
        d = step.get("data", {})
        rows.append({
            "artifact": "/".join(p for p in (model, fmt, qtype) if p),
            "model": model, "format": fmt, "type": qtype,
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


def markdown(data: dict[str, Any]) -> str:
    lines = [f"### quantforge build: {'ok' if data['ok'] else 'FAILED'} ({data['seconds']:.0f} s)", "",
             "| artifact | size MB | bits/weight | PPL | ΔPPL | KLD | top-1 | fallbacks | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in artifact_rows(data):
        lines.append(f"| {row['artifact']} | {row['size_mb']} | {row['bpw']} | {format_num(row['ppl'])} | "
                     f"{format_pct(row['delta_ppl'])} | {format_num(row['kld'], 4)} | "
                     f"{format_pct(row['top1'], signed=False)} | "
                     f"{row['fallbacks']} | {row['gate']} |")
    for step in data["steps"]:
        if step["status"] == "failed":
            lines.append(f"\n**{step['label']} failed:** {step.get('error')} (log: `{step.get('log')}`)")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    lines += ["", f"Steps: {counts}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ merge

# GitHub takes at most 1 MiB per step summary; keep a margin for what the workflow adds around it
MAX_SUMMARY_BYTES = 1_000_000


def read_leg(path: Path) -> dict[str, Any]:
    """One leg's report (`build --json`'s output or a work dir's reports/*.json); an unreadable one is a failed
    leg with the reason, never an exception: the summary must name every leg."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError("not a quantforge build report")
    except (OSError, ValueError) as exc:
        return {"leg": path.stem, "ok": False, "counts": {}, "seconds": 0, "published": [], "artifacts": [],
                "failures": [{"label": path.name, "error": f"unreadable report ({exc})"}]}
    return leg_summary(data, path.stem)


def leg_summary(data: dict[str, Any], fallback_name: str) -> dict[str, Any]:
    """What a leg built, reused, published and failed, from its build report."""
    steps = data["steps"]
    models = sorted({s.get("model") for s in steps if s.get("model")})
    published = []
    for step in steps:
        if step.get("kind") == "publish" and step.get("status") in ("built", "reused"):
            d = step.get("data", {})
            published.append({"repo_id": d.get("repo_id"), "location": d.get("location"),
                              "status": "up to date" if step["status"] == "reused" else
                              ("new commit" if d.get("uploaded") else "unchanged")})
    failures = [{"label": s["label"], "error": s.get("error") or "", "log": s.get("log")}
                for s in steps if s.get("status") == "failed"]
    rows = [{k: v for k, v in row.items() if k != "sample"} for row in artifact_rows(data)]
    return {"leg": ", ".join(models) or fallback_name, "ok": bool(data.get("ok")), "counts": data.get("counts", {}),
            "seconds": data.get("seconds", 0), "published": published, "artifacts": rows, "failures": failures}


def merge(paths: list[Path], expected: list[str] = ()) -> dict[str, Any]:
    """The legs' reports as one: `expected` legs (the matrix's models) without a report count as failed."""
    legs = [read_leg(p) for p in paths]
    seen = {name for leg in legs for name in leg["leg"].split(", ")}
    for model in expected:
        if model not in seen:
            legs.append({"leg": model, "ok": False, "counts": {}, "seconds": 0, "published": [], "artifacts": [],
                         "failures": [{"label": model, "error": "no report: the leg failed before its build "
                                                                  "reported, or was cancelled or timed out"}]})
    return {"ok": all(leg["ok"] for leg in legs), "legs": legs}


def _cell(text: Any, limit: int = 300) -> str:
    one_line = " ".join(str(text).split())
    return (one_line[:limit] + "…" if len(one_line) > limit else one_line).replace("|", "\\|")


def merged_markdown(merged: dict[str, Any], limit: int = MAX_SUMMARY_BYTES) -> str:
    """The nightly's summary: a row per leg, the artifacts measured, the failures and why; cut to `limit` bytes."""
    legs = merged["legs"]
    failed = [leg for leg in legs if not leg["ok"]]
    head = [f"### quantforge nightly: {'ok' if not failed else 'FAILED'} ({len(legs)} legs"
            + (f", {len(failed)} failed)" if failed else ")"), "",
            "| leg | result | built | reused | failed | published | time |", "|---|---|---:|---:|---:|---|---:|"]
    for leg in legs:
        c = leg["counts"]
        repos = "; ".join(f"{p['repo_id']} ({p['status']})" for p in leg["published"]) or "-"
        head.append(f"| {_cell(leg['leg'])} | {'ok' if leg['ok'] else '**FAILED**'} | {c.get('built', 0)} | "
                    f"{c.get('reused', 0)} | {c.get('failed', 0)} | {_cell(repos, 2000)} | {leg['seconds']:.0f} s |")
    tail = ["", "#### Failures", ""] if failed else []
    for leg in failed:
        tail += [f"- **{_cell(f['label'])}** ({_cell(leg['leg'])}): {_cell(f['error'], 1000)}" for f in leg["failures"]]
        if not leg["failures"]:
            tail.append(f"- **{_cell(leg['leg'])}**: steps were skipped or not run")
    rows = [row for leg in legs for row in leg["artifacts"]]
    table = ["", "#### Artifacts built", "",
             "| artifact | size MB | bits/weight | PPL | ΔPPL | KLD | top-1 | fallbacks | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    table += [f"| {row['artifact']} | {row['size_mb']} | {row['bpw']} | {format_num(row['ppl'])} | "
              f"{format_pct(row['delta_ppl'])} | {format_num(row['kld'], 4)} | "
              f"{format_pct(row['top1'], signed=False)} | {row['fallbacks']} | {row['gate']} |" for row in rows]
    if not rows:
        table = []

    def text(table_rows: list[str]) -> str:
        return "\n".join([*head, *tail, *table_rows, ""])

    out, kept = text(table), len(rows)
    while len(out.encode()) > limit and kept > 0:  # the legs and failures matter more than every figure
        kept = max(0, kept - max(1, (len(out.encode()) - limit) // 60 + 1))
        out = text([*table[:5 + kept], "", f"({len(rows) - kept} artifact rows left out to stay under GitHub's "
                    "summary limit; the merged JSON has them all)"])
    return out if len(out.encode()) <= limit else out.encode()[:limit].decode(errors="ignore")
