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


def print_summary(data: dict[str, Any], report_path: Path) -> None:
    """A finished build on the console (stderr): a table per model and format, what was published, the verdict."""
    from rich.console import Console
    from rich.table import Table

    from .figures import format_num, format_pct
    from .steps.evaluation import VERIFY_PROMPT

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console.width = 140  # CI logs do not wrap; an 80-column guess would squeeze the table unreadable
    groups: dict[str, list[dict]] = {}
    for row in artifact_rows(data):
        # one table per model and format; a row per type (a one-artifact format's row is named by the format)
        group = f"{row['model']}/{row['format']}" if row["type"] else row["model"]
        groups.setdefault(group, []).append({**row, "type": row["type"] or row["format"]})
    for group, rows in groups.items():
        table = Table(title=group, title_justify="left", box=None, pad_edge=False)
        table.add_column("type", no_wrap=True)
        for col in ("MB", "bits/w", "PPL", "ΔPPL", "KLD", "top-1", "fallbacks", "gate"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column(f"{VERIFY_PROMPT} ...", no_wrap=True, overflow="ellipsis", max_width=28)
        for r in rows:
            table.add_row(r["type"], str(r["size_mb"]), str(r["bpw"]), format_num(r["ppl"]),
                          format_pct(r["delta_ppl"]), format_num(r["kld"], 4), format_pct(r["top1"], signed=False),
                          str(r["fallbacks"]), r["gate"],
                          repr((r["sample"] or "")[:40]))
        source_ppl = next((r["source_ppl"] for r in rows if r["source_ppl"]), None)
        if source_ppl:
            table.caption = f"source PPL {source_ppl:.3f}, same token windows"
            table.caption_justify = "left"
        console.print(table)
    for step in data["steps"]:
        if step["kind"] == "publish" and step["status"] in ("built", "reused"):
            console.print(f"published {step['data'].get('repo_id')} -> {step['data'].get('location')}")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    verdict = "ok" if data["ok"] else "FAILED"
    console.print(f"{verdict}: {counts} in {data['seconds']:.1f} s; report {report_path}")


def evaluation_line(name: str, d: dict[str, Any]) -> str:
    """`quantforge eval`'s one line: an artifact's measurements against its source."""
    parity = d.get("tokenizer") or {}
    return (f"{name}: PPL {format_num(d['ppl'], 4)} ± {format_num(d['ppl_err'], 4)} (source "
            f"{format_num(d['source_ppl'], 4)}, ΔPPL {format_pct(d['delta_ppl'])}), KLD "
            f"{format_num(d['kld_mean'], 5)} (p99 {format_num(d['kld_p99'], 5)}), top-1 "
            f"{format_pct(d['top1'], signed=False)}, {d['tokens_scored']} tokens scored; tokenizer "
            f"{'matches' if parity.get('same', True) else 'DIFFERS: ' + parity['first_difference']}")


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


# What became of an artifact (`--json`'s "artifacts"): passed its gate; failed-gate (measured, outside its limits);
# failed (before its gate: `step` names the step that failed, the artifact's own or one it needs, and `reason` says
# why); not-run (the build stopped first, after another failure); up-to-date (its repo records it: nothing ran);
# would-build (a dry run)
ARTIFACT_STATUSES = ("passed", "failed-gate", "failed", "not-run", "up-to-date", "would-build")


def artifact_statuses(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per artifact of a build report (its steps from `artifact` to `gate`, grouped by model, format and
    type), with its status (ARTIFACT_STATUSES) and, when it did not pass, the step and the reason."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for step in data["steps"]:
        if step.get("stage") in ("artifact", "verify", "evaluate", "gate"):
            groups.setdefault((step.get("model"), step.get("format"), step.get("type")), []).append(step)
    by_label = {step["label"]: step for step in data["steps"]}
    return [{"artifact": "/".join(p for p in which if p), "model": which[0], "format": which[1], "type": which[2],
             **artifact_status(steps, by_label)} for which, steps in groups.items()]


def artifact_status(steps: list[dict[str, Any]], by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The status of one artifact from its steps' results (in order, artifact to gate) and every step's by label
    (to find the failure upstream that stopped it)."""
    gate = next((s for s in steps if s.get("stage") == "gate"), None)
    if gate is not None and gate["status"] in ("built", "reused"):
        return {"status": "passed", "gate": gate.get("data", {}).get("gate")}
    if gate is not None and gate["status"] == "failed":
        return {"status": "failed-gate", **_failure(gate)}
    for step in steps:
        if step["status"] == "failed":
            return {"status": "failed", **_failure(step)}
    blocked = next((s for s in steps if s["status"] in ("skipped", "not-run")), None)
    if blocked is not None:
        cause = _first_failure(blocked, by_label)
        if blocked["status"] == "skipped" and cause is not None:
            return {"status": "failed", **_failure(cause)}
        return {"status": "not-run", **({"after": _failure(cause)} if cause else {})}
    if any(s["status"] == "would-build" for s in steps):
        return {"status": "would-build"}
    return {"status": "up-to-date"}


def _failure(step: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {"step": step["label"], "reason": step.get("error"), "kind": step.get("error_kind"),
                              "hint": step.get("hint"), "log": step.get("log")}.items() if v}


def _first_failure(step: dict[str, Any], by_label: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The failed step that kept `step` from running: along `input-failed` reasons; for a build stopped without
    --keep-going, the first failure of the build."""
    seen: set[str] = set()
    while step["status"] != "failed" and step["label"] not in seen:
        seen.add(step["label"])
        blocked = [label for r in step.get("reasons", []) if r.get("what") == "input-failed"
                   for label in r.get("new") or ()]
        if not blocked or blocked[0] not in by_label:
            return next((s for s in by_label.values() if s["status"] == "failed"), None)
        step = by_label[blocked[0]]
    return step if step["status"] == "failed" else None


def first_error(data: dict[str, Any]) -> dict[str, Any] | None:
    """The first failed step of a build report as `--json`'s "error" (kind, message, hint, step, log)."""
    failed = next((s for s in data["steps"] if s.get("status") == "failed"), None)
    if failed is None:
        return None
    return {k: v for k, v in {"kind": failed.get("error_kind") or "StepFailed", "message": failed.get("error"),
                              "hint": failed.get("hint"), "step": failed["label"], "log": failed.get("log")}.items()
            if v}


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
