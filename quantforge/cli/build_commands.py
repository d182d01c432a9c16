"""The commands of a build: validate, plan, build, card, push, and eval (an artifact made elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError, QuantforgeError
from .common import (
    DEFAULT_WORK_DIR,
    IgnorePublishedOpt,
    JsonOpt,
    LlamaCppOpt,
    NoRunnerCheckOpt,
    OfflineOpt,
    OnlyOpt,
    TargetsArg,
    VerifyOpt,
    WorkDirOpt,
    _exits,
    _fail,
    _plan,
    app,
)


@app.command()
def validate(targets_file: TargetsArg, no_runner_check: NoRunnerCheckOpt = False) -> None:
    """Check a targets file; print every problem with its file, line and key; refuse a nightly leg that does not
    fit its runner, where the source's size is known without a request."""
    from ..errors import ConfigIssue
    from ..fit import check_targets
    from ..pipeline import load_targets
    from ..steps.source import local_source_gaps

    try:
        targets = load_targets(targets_file)
        if gaps := local_source_gaps(targets):  # a local folder must hold what a build reads
            raise ConfigError([ConfigIssue(str(targets_file), None, f"models[{i}].source", g) for i, g in gaps])
        notes = [] if no_runner_check else check_targets(targets, DEFAULT_WORK_DIR)
    except QuantforgeError as exc:
        raise _fail(exc) from None
    n = sum(m.formats.settings(f).artifact_count() for m in targets.models for f in m.formats.enabled())
    typer.echo(f"{targets_file}: ok ({len(targets.models)} models, {n} artifacts)")
    for note in notes:
        typer.echo(f"{targets_file}: note: {note}", err=True)
    from ..publish import release_warnings

    for warning in release_warnings(targets):  # valid, but the Hub would show no model tree or licence
        typer.echo(f"{targets_file}: warning: {warning}", err=True)


@app.command()
def plan(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
         json_output: JsonOpt = False, offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None,
         github_matrix: Annotated[bool, typer.Option(
             "--github-matrix", help="Print the GitHub Actions matrix of nightly legs, {\"include\": [...]}: one per "
                                     "model with anything stale (model, runs-on, reasons, disk, memory, time, "
                                     "timeout, gpu, hosted).")] = False,
         every_model: Annotated[bool, typer.Option("--all", help="With --github-matrix: a leg for every model, "
                                                   "stale or not.")] = False,
         ignore_published: IgnorePublishedOpt = False, no_runner_check: NoRunnerCheckOpt = False,
         verify_published: VerifyOpt = False) -> None:
    """Show every step and whether it is up to date, and why not. Refuses a nightly leg (the model's stale
    steps) whose estimated disk, memory or time does not fit its runner."""
    from ..console import reason_text
    from ..core.engine import must_run
    from ..publish import unlisted_warnings
    from ..steps.memory import memory_plan

    with _exits(json_output, steps=[]):
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp)
        # a step the work dir lacks may be up to date by its repo's record (one request per repo; not --offline)
        todo = must_run(the_plan, work, remote=not (offline or ignore_published), verify=verify_published)
        if not (offline or ignore_published):
            from ..steps.source import same_files_notes

            for note in same_files_notes(s for s in the_plan.steps if s.label not in todo):
                typer.echo(f"note: {note}", err=True)
        if github_matrix:
            from ..nightly import github_matrix as matrix_of

            matrix, notes = matrix_of(the_plan, todo, every_model=every_model, check=not no_runner_check)
            for note in notes:  # stdout is the matrix
                typer.echo(f"note: {note}", err=True)
            typer.echo(json.dumps(matrix, separators=(",", ":")))
            return
        if not no_runner_check:
            from ..fit import check_plan

            check_plan(the_plan, todo)
        memory = memory_plan(the_plan.steps)  # expected peak of each heavy step against what is free now
        warnings = unlisted_warnings(the_plan.steps, work)  # files a repo holds that its publication does not list
    if json_output:
        rows = [{"label": s.label, "kind": s.kind, "key": s.key, "model": s.model, "format": s.fmt, "type": s.qtype,
                 "status": "stale" if s.label in todo else "up-to-date",
                 "reasons": [r.to_json() for r in todo.get(s.label, [])]} for s in the_plan.steps]
        typer.echo(json.dumps({"ok": True, "steps": rows, "memory": memory.to_json(), "warnings": warnings},
                              indent=2, default=str))
        return
    for step in the_plan.steps:
        reasons = todo.get(step.label, [])
        why = f"  ({'; '.join(reason_text(r) for r in reasons)})" if reasons else ""
        typer.echo(f"{'stale' if reasons else 'up-to-date':<10} {step.label}{why}")
    typer.echo(f"{len(todo)} of {len(the_plan.steps)} steps to run")
    typer.echo("".join(f"warning: {w['message']}\n" for w in warnings), nl=False)
    if memory.steps:
        typer.echo("\n".join(memory.lines()))


@app.command()
def build(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
          keep_going: Annotated[bool, typer.Option("--keep-going", help="After a failure, go on with the steps "
                                                   "that do not depend on it.")] = False,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would run; run nothing.")] = False,
          threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp "
                                                      "(default: all).")] = None,
          no_gate: Annotated[bool, typer.Option("--no-gate", help="Measure quality but publish artifacts that "
                                                "miss their gates (for experiments; recorded).")] = False,
          no_memory_check: Annotated[bool, typer.Option("--no-memory-check", help="Start steps whose memory "
                                                        "estimate exceeds what is available.")] = False,
          evict: Annotated[bool | None, typer.Option(
              "--evict/--no-evict", help="Delete the intermediate after its last quantization and each artifact "
                                         "once published (to the Hub: once uploaded, ahead of the commit) "
                                         "(default: $QUANTFORGE_EVICT, else off).")] = None,
          no_disk_check: Annotated[bool, typer.Option("--no-disk-check", help="Start even when the expected peak "
                                                      "disk use exceeds the free space.")] = False,
          keep_removed: Annotated[bool, typer.Option("--keep-removed", help="Keep the published files of types "
                                                     "no longer in the targets file (default: a publish deletes "
                                                     "those its repo's quantforge.json lists).")] = False,
          json_output: JsonOpt = False, offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None,
          ignore_published: IgnorePublishedOpt = False, verify_published: VerifyOpt = False) -> None:
    """Build every stale artifact, check it against its source, and publish what passes."""
    import os

    from ..console import make_reporter
    from ..core.engine import must_run, run_plan
    from ..core.step import BuildOptions
    from ..steps.disk import check_disk
    from ..steps.memory import check_fits

    if evict is None:  # a CI leg's work dir is thrown away: what it no longer needs only takes disk
        evict = os.environ.get("QUANTFORGE_EVICT", "") not in ("", "0", "false")
    with _exits(json_output, artifacts=[], steps=[]):
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp, enforce_gates=not no_gate)
        if not dry_run and not (no_memory_check and no_disk_check):
            todo = must_run(the_plan, work, remote=not (offline or ignore_published), verify=verify_published)
            if not no_disk_check:  # before anything is downloaded: both numbers now, not a full disk hours in
                check_disk(the_plan.steps, todo, work_root=work.root, evict=evict)
            if not no_memory_check:  # refuse what cannot fit, rather than be killed half-way
                check_fits(s for s in the_plan.steps if s.label in todo)
        options = BuildOptions(keep_going=keep_going, dry_run=dry_run, threads=threads, llama_cpp_dir=llama_cpp,
                               offline=offline or ignore_published, evict=evict, keep_removed=keep_removed,
                               verify_published=verify_published)
        result = run_plan(the_plan, work, options, make_reporter(json_output))
        _finish(result, work, json_output)


def _finish(result, work, json_output: bool) -> None:
    """Save the report, print it (JSON or a summary), exit 0 or 1."""
    from .. import report as report_mod
    from ..store import finite_json

    data = finite_json(result.to_json())
    try:
        path: Path | None = report_mod.save(result, work)
    except QuantforgeError as exc:  # a full disk: the build's outcome is still told, here
        typer.echo(f"warning: the report was not saved: {exc}", err=True)
        path = None
    if json_output:
        typer.echo(json.dumps({**data, "error": report_mod.first_error(data),
                               "artifacts": report_mod.artifact_statuses(data),
                               "report": path and str(path)}, indent=2, allow_nan=False))
    else:
        report_mod.print_summary(data, path)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def card(targets_file: TargetsArg, work_dir: WorkDirOpt = DEFAULT_WORK_DIR, only: OnlyOpt = None,
         offline: OfflineOpt = False, llama_cpp: LlamaCppOpt = None) -> None:
    """Render each repo's model card from what the last build made, without publishing."""
    from ..core.engine import load_inputs
    from ..publish import CARD_FILE, render_card

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
    from ..console import make_reporter
    from ..core.engine import load_inputs, run_plan
    from ..core.plan import Plan, topological
    from ..core.registry import kind_info
    from ..core.step import BuildOptions

    with _exits(json_output, artifacts=[], steps=[]):
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp, publish_to=to)
        work.check_unlocked()  # a build still running: its outputs are not there yet, and it publishes itself
        # the publish steps and, to the Hub, the uploads ahead of them: what a push runs
        publishing = [s for s in the_plan.steps if kind_info(s.kind).stage == "publish"]
        for step in publishing:  # every artifact built and past its gate, or a clear error
            load_inputs(step, work, made_first={s.label for s in publishing})
        result = run_plan(Plan(the_plan.targets, topological(publishing)), work, BuildOptions(keep_going=True),
                          make_reporter(json_output))
        _finish(result, work, json_output)


@app.command("eval")
def eval_(artifact: Annotated[Path, typer.Argument(help="An artifact to measure: a GGUF file, or a checkpoint "
                                                    "folder of a format quantforge builds.",
                                                    show_default=False)],
          source: Annotated[str, typer.Option("--source", help="The model it was made from: a local folder or a "
                                              "Hub repo id.", show_default=False)],
          revision: Annotated[str, typer.Option("--revision", help="Hub revision of the source.")] = "main",
          dataset: Annotated[str, typer.Option("--dataset", help="builtin | builtin:mix | file:PATH | "
                                               "hf:REPO:CONFIG:SPLIT:COLUMN")] = "builtin",
          ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.")] = 512,
          chunks: Annotated[int, typer.Option("--chunks", help="Number of windows.")] = 32,
          max_ppl_increase: Annotated[float | None, typer.Option(
              "--max-ppl-increase", help="Fail (exit 1) above this relative PPL increase, e.g. 0.05.")] = None,
          max_kld: Annotated[float | None, typer.Option("--max-kld", help="Fail above this mean KLD.")] = None,
          work_dir: WorkDirOpt = DEFAULT_WORK_DIR, json_output: JsonOpt = False, offline: OfflineOpt = False) -> None:
    """Measure an artifact made elsewhere (a GGUF, a quantized checkpoint) against its source model: PPL, ΔPPL, KLD,
    top-1, tokenizer."""
    from pydantic import ValidationError

    from ..config.schema import EvaluationSettings, check_gate_limit
    from ..console import make_reporter
    from ..core.engine import run_plan
    from ..core.step import BuildOptions, PlanContext
    from ..errors import BadInputError
    from ..pipeline import plan_adhoc
    from ..report import artifact_status, evaluation_line, first_error
    from ..store import WorkDir, finite_json

    with _exits(json_output, artifact=str(artifact), status="failed"):
        if Path(source).expanduser().is_dir():  # an existing folder is local, with or without ./
            source = str(Path(source).expanduser().resolve())
        try:
            settings = EvaluationSettings(dataset=dataset, ctx=ctx, chunks=chunks)
        except ValidationError as exc:
            raise BadInputError("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) from None
        for table, limit in (("max_ppl_increase", max_ppl_increase), ("max_kld", max_kld)):
            try:  # the bounds a targets file's gates have
                check_gate_limit(table, limit or 0.0)
            except ValueError as exc:
                raise BadInputError(f"--{table.replace('_', '-')}: {exc}") from None
        work = WorkDir(work_dir)
        context = PlanContext(work=work, offline=offline)
        the_plan = plan_adhoc(artifact, source, revision, settings, context, max_ppl_increase, max_kld)
        result = run_plan(the_plan, work, BuildOptions(keep_going=True), make_reporter(json_output))
    data = finite_json(result.to_json())
    by_label = {s["label"]: s for s in data["steps"]}
    # the artifact's own steps, by what they are (a label is named after the file, a symlink's target's name)
    mine = {s["stage"]: s for s in data["steps"] if s.get("stage") in ("artifact", "evaluate", "gate")}
    status = artifact_status([mine[stage] for stage in ("artifact", "evaluate", "gate")], by_label)
    evaluation, gate = mine["evaluate"], mine["gate"]
    if json_output:
        gate_text = {"passed": "pass", "failed-gate": gate.get("error")}.get(status["status"])  # None: not reached
        typer.echo(json.dumps({"artifact": str(artifact), "ok": result.ok, **evaluation.get("data", {}),
                               **{k: v for k, v in status.items() if k != "gate"}, "gate": gate_text,
                               "error": first_error(data)}, indent=2, allow_nan=False))
    elif evaluation.get("data"):
        typer.echo(evaluation_line(artifact.name, evaluation["data"]))
        if gate.get("error"):
            typer.echo(f"error: {gate['error']}", err=True)
    raise typer.Exit(0 if result.ok else 1)
