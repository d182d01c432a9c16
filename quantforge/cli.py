"""The `quantforge` command. Thin: parse, call the library, print. Library errors become one line + exit code:
0 ok, 1 build or check failure, 2 bad input."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import ConfigError, QuantforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Declarative quantization builds: targets.yaml in, verified GGUF, GPTQ and AWQ repos out.")

TargetsArg = Annotated[Path, typer.Argument(help="The targets file (targets.yaml).", show_default=False)]
WorkDirOpt = Annotated[Path, typer.Option("--work-dir", help="Where step outputs, logs and reports live.")]
OnlyOpt = Annotated[str | None, typer.Option("--only", help="Restrict to MODEL or MODEL/FORMAT.",
                                              metavar="MODEL[/FORMAT]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Resolve Hub revisions from the local HF cache only.")]
LlamaCppOpt = Annotated[str | None, typer.Option(
    "--llama-cpp", help="Use this llama.cpp checkout's converter instead of the one matching llama-cpp-python "
                        "(also: QUANTFORGE_LLAMA_CPP_DIR).", metavar="DIR")]
DEFAULT_WORK_DIR = Path(".quantforge")


def _fail(exc: QuantforgeError) -> typer.Exit:
    err = typer.echo
    if isinstance(exc, ConfigError):
        for issue in exc.issues:
            err(f"error: {issue}", err=True)
    else:
        err(f"error: {exc}", err=True)
    hint = getattr(exc, "hint", None)
    if hint:
        err(f"hint: {hint}", err=True)
    return typer.Exit(exc.exit_code)


def _plan(targets_file: Path, work_dir: Path, only: str | None, offline: bool, llama_cpp: str | None,
          enforce_gates: bool = True, publish_to: str | None = None):
    from .config import load_targets, with_publish_to
    from .plan import PlanContext, build_plan
    from .store import WorkDir

    targets = load_targets(targets_file)
    if publish_to:
        targets = with_publish_to(targets, publish_to)
    work = WorkDir(work_dir)
    context = PlanContext(work=work, offline=offline, llama_cpp_dir=llama_cpp, enforce_gates=enforce_gates)
    return build_plan(targets, context).select(only), work


@app.command()
def validate(targets_file: TargetsArg) -> None:
    """Check a targets file; print every problem with its file, line and key."""
    from .config import load_targets

    try:
        targets = load_targets(targets_file)
    except QuantforgeError as exc:
        raise _fail(exc) from None
    n = sum(len(m.formats.gguf.types) if f == "gguf" else 1 for m in targets.models for f in m.formats.enabled())
    typer.echo(f"{targets_file}: ok ({len(targets.models)} models, {n} artifacts)")


@app.command()
def plan(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
         json_output: JsonOpt = False, offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Show every step and whether it is up to date, and why not."""
    from .engine import must_run

    try:
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp)
        todo = must_run(the_plan, work)
    except QuantforgeError as exc:
        raise _fail(exc) from None
    rows = [{"label": s.label, "kind": s.kind, "key": s.key,
             "status": "stale" if s.label in todo else "up-to-date", "reasons": todo.get(s.label, [])}
            for s in the_plan.steps]
    if json_output:
        typer.echo(json.dumps({"steps": rows}, indent=2))
        return
    for row in rows:
        why = f"  ({'; '.join(row['reasons'])})" if row["reasons"] else ""
        typer.echo(f"{row['status']:<10} {row['label']}{why}")
    typer.echo(f"{len(todo)} of {len(rows)} steps to run")


@app.command()
def build(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
          keep_going: Annotated[bool, typer.Option("--keep-going", help="After a failure, go on with the steps "
                                                   "that do not depend on it.")] = False,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would run; run nothing.")] = False,
          threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp "
                                                      "(default: all).")] = None,
          no_gate: Annotated[bool, typer.Option("--no-gate", help="Measure quality but publish artifacts that "
                                                "miss their gates (for experiments; recorded).")] = False,
          json_output: JsonOpt = False, offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Build every stale artifact, check it against its source, and publish what passes."""
    from .console import make_reporter
    from .engine import BuildOptions, run_plan

    try:
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp, enforce_gates=not no_gate)
        options = BuildOptions(keep_going=keep_going, dry_run=dry_run, threads=threads, llama_cpp_dir=llama_cpp)
        result = run_plan(the_plan, work, options, make_reporter(json_output))
    except QuantforgeError as exc:
        raise _fail(exc) from None
    _finish(result, work, json_output)


def _finish(result, work, json_output: bool) -> None:
    """Save the report, print it (JSON or a summary), exit 0 or 1."""
    from . import report as report_mod

    path = report_mod.save(result, work)
    data = result.to_json()
    if json_output:
        typer.echo(json.dumps({**data, "report": str(path)}, indent=2))
    else:
        _print_summary(data, path)
    raise typer.Exit(0 if result.ok else 1)


def _print_summary(data: dict, report_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from .formats.gguf import VERIFY_PROMPT
    from .report import artifact_rows, fmt_num, fmt_pct

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console.width = 140  # CI logs do not wrap; an 80-column guess would squeeze the table unreadable
    groups: dict[str, list[dict]] = {}
    for row in artifact_rows(data):
        group, _, gguf_type = row["artifact"].rpartition("/")
        groups.setdefault(group, []).append({**row, "type": gguf_type})
    for group, rows in groups.items():
        table = Table(title=group, title_justify="left", box=None, pad_edge=False)
        table.add_column("type", no_wrap=True)
        for col in ("MB", "bits/w", "PPL", "ΔPPL", "KLD", "top-1", "fallbacks", "gate"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column(f"{VERIFY_PROMPT} ...", no_wrap=True, overflow="ellipsis", max_width=28)
        for r in rows:
            table.add_row(r["type"], str(r["size_mb"]), str(r["bpw"]), fmt_num(r["ppl"]), fmt_pct(r["delta_ppl"]),
                          fmt_num(r["kld"], 4), fmt_pct(r["top1"])[1:], str(r["fallbacks"]), r["gate"],
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


@app.command()
def card(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
         offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Render each repo's model card from what the last build made, without publishing."""
    from .engine import load_inputs
    from .publish import CARD_FILE, render_card

    try:
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp)
        for step in the_plan.steps:
            if step.kind == "publish":
                path = work.root / "cards" / step.params["repo_id"] / CARD_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(render_card(step, load_inputs(step, work)), encoding="utf-8")
                typer.echo(str(path))
    except QuantforgeError as exc:
        raise _fail(exc) from None


@app.command()
def push(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
         to: Annotated[str | None, typer.Option("--to", help="Publish here instead of each model's publish.to: "
                                                "hub or dir:PATH.", metavar="DEST")] = None,
         json_output: JsonOpt = False, offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Publish what a previous build made and checked; builds nothing."""
    from .console import make_reporter
    from .engine import BuildOptions, load_inputs, run_plan
    from .plan import Plan, topological

    try:
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp, publish_to=to)
        publish_steps = [s for s in the_plan.steps if s.kind == "publish"]
        for step in publish_steps:
            load_inputs(step, work)  # every artifact built and past its gate, or a clear error
        result = run_plan(Plan(the_plan.targets, topological(publish_steps)), work, BuildOptions(keep_going=True),
                          make_reporter(json_output))
    except QuantforgeError as exc:
        raise _fail(exc) from None
    _finish(result, work, json_output)


@app.command("eval")
def eval_(artifact: Annotated[Path, typer.Argument(help="A GGUF file, or a GPTQ/AWQ checkpoint folder, to measure.",
                                                    show_default=False)],
          source: Annotated[str, typer.Option("--source", help="The model it was made from: a local folder or a "
                                              "Hub repo id.", show_default=False)],
          revision: Annotated[str, typer.Option("--revision", help="Hub revision of the source.")] = "main",
          dataset: Annotated[str, typer.Option("--dataset", help="builtin | file:PATH | "
                                               "hf:REPO:CONFIG:SPLIT:COLUMN")] = "builtin",
          ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.")] = 512,
          chunks: Annotated[int, typer.Option("--chunks", help="Number of windows.")] = 32,
          max_ppl_increase: Annotated[float | None, typer.Option(
              "--max-ppl-increase", help="Fail (exit 1) above this relative PPL increase, e.g. 0.05.")] = None,
          max_kld: Annotated[float | None, typer.Option("--max-kld", help="Fail above this mean KLD.")] = None,
          work_dir: WorkDirOpt = DEFAULT_WORK_DIR, json_output: JsonOpt = False, offline: OfflineOpt = False) -> None:
    """Measure a GGUF or a GPTQ/AWQ checkpoint against its source model: PPL, ΔPPL, KLD, top-1, tokenizer."""
    from pydantic import ValidationError

    from .config import EvaluationSettings
    from .console import make_reporter
    from .engine import BuildOptions, run_plan
    from .errors import BadInputError
    from .evaluate import plan_adhoc
    from .plan import PlanContext
    from .store import WorkDir

    try:
        try:
            settings = EvaluationSettings(dataset=dataset, ctx=ctx, chunks=chunks)
        except ValidationError as exc:
            raise BadInputError("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from None
        work = WorkDir(work_dir)
        context = PlanContext(work=work, offline=offline)
        the_plan = plan_adhoc(artifact, source, revision, settings, context, max_ppl_increase, max_kld)
        result = run_plan(the_plan, work, BuildOptions(keep_going=True), make_reporter(json_output))
    except QuantforgeError as exc:
        raise _fail(exc) from None
    steps = {r.label: r for r in result.results}
    evaluation = steps[f"{artifact.name}:evaluate"]
    gate = steps[f"{artifact.name}:gate"]
    if json_output:
        typer.echo(json.dumps({"artifact": str(artifact), "ok": result.ok, **evaluation.data,
                               "gate": gate.error or "pass"}, indent=2))
    elif evaluation.data:
        d = evaluation.data
        typer.echo(f"{artifact.name}: PPL {d['ppl']:.4f} ± {d['ppl_err']:.4f} (source {d['source_ppl']:.4f}, "
                   f"ΔPPL {d['delta_ppl']:+.2%}), KLD {d['kld_mean']:.5f} (p99 {d['kld_p99']:.5f}), "
                   f"top-1 {d['top1']:.2%}, {d['tokens_scored']} tokens scored; tokenizer "
                   f"{'matches' if d['tokenizer']['same'] else 'DIFFERS: ' + d['tokenizer']['first_difference']}")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def doctor(json_output: JsonOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Report the toolchain: versions, llama.cpp converter, GPU."""
    from .doctor import collect

    info = collect(llama_cpp)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key:<22} {value}")
    raise typer.Exit(0 if info.get("problems") in (None, "none") else 1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
