"""The `quantforge` command. Thin: parse, call the library, print. Library errors become one line + exit code:
0 ok, 1 build or check failure, 2 bad input."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import ConfigError, QuantforgeError, RunnerTooSmall

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Declarative quantization builds: targets.yaml in, quantized repos out, every artifact "
                       "checked by its real consumer first.")

TargetsArg = Annotated[Path, typer.Argument(help="The targets file (targets.yaml).", show_default=False)]
WorkDirOpt = Annotated[Path, typer.Option("--work-dir", help="Where step outputs, logs and reports live.")]
OnlyOpt = Annotated[str | None, typer.Option("--only", help="Restrict to MODEL or MODEL/FORMAT.",
                                              metavar="MODEL[/FORMAT]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Resolve Hub revisions from the local HF cache only.")]
LlamaCppOpt = Annotated[str | None, typer.Option(
    "--llama-cpp", help="Use this llama.cpp checkout's converter instead of the one matching llama-cpp-python "
                        "(also: QUANTFORGE_LLAMA_CPP_DIR).", metavar="DIR")]
IgnorePublishedOpt = Annotated[bool, typer.Option(
    "--ignore-published", help="Judge by the work dir alone: do not read what the repos record (quantforge.json), "
                               "so a fresh work dir rebuilds everything.")]
NoRunnerCheckOpt = Annotated[bool, typer.Option(
    "--no-runner-check", help="Do not check that each model's nightly leg fits its runner (`runner:`): for builds "
                              "that do not run there.")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify-published", help="Compare each published file's sha256 with what was published (plain runs compare "
                               "sizes): a folder's files are read; the Hub's LFS hashes are listed, not downloaded.")]
DEFAULT_WORK_DIR = Path(".quantforge")


def _fail(exc: QuantforgeError, json_output: bool = False, **document: Any) -> typer.Exit:
    err = typer.echo
    if isinstance(exc, ConfigError):
        for issue in exc.issues:
            err(f"error: {issue}", err=True)
    elif isinstance(exc, RunnerTooSmall):
        for line in exc.lines:
            err(f"error: {line}", err=True)
    else:
        err(f"error: {exc}", err=True)
    hint = getattr(exc, "hint", None)
    if hint:
        err(f"hint: {hint}", err=True)
    if json_output:
        error = {"kind": type(exc).__name__, "message": str(exc), "hint": hint, "exit_code": exc.exit_code}
        if isinstance(exc, ConfigError):
            error["issues"] = [str(issue) for issue in exc.issues]
        typer.echo(json.dumps({"ok": False, **document, "error": error}, indent=2, default=str))
    return typer.Exit(exc.exit_code)


@contextmanager
def _exits(json_output: bool, **document: Any) -> Iterator[None]:
    """Library errors become one line and an exit code; with --json every exit also prints one JSON document on
    stdout (`document` is what it holds besides `ok` and `error`), an interruption and a bug in quantforge too."""
    try:
        yield
    except QuantforgeError as exc:
        raise _fail(exc, json_output, **document) from None
    except (typer.Exit, typer.Abort):
        raise
    except (Exception, KeyboardInterrupt) as exc:
        if not json_output:
            raise
        interrupted = isinstance(exc, KeyboardInterrupt)
        if not interrupted:
            import traceback

            traceback.print_exc()
        error = {"kind": "Interrupted" if interrupted else type(exc).__name__,
                 "message": "interrupted (SIGINT or SIGTERM)" if interrupted else str(exc) or type(exc).__name__,
                 "hint": None if interrupted else "a bug in quantforge: please report it with the traceback on stderr"}
        typer.echo(json.dumps({"ok": False, **document, "error": error}, indent=2, default=str))
        raise typer.Exit(130 if interrupted else 1) from None


def _plan(targets_file: Path, work_dir: Path, only: str | None, offline: bool, llama_cpp: str | None,
          enforce_gates: bool = True, publish_to: str | None = None):
    from .config.schema import with_publish_to
    from .core.step import PlanContext
    from .pipeline import build_plan, load_targets
    from .store import WorkDir

    targets = load_targets(targets_file)
    if publish_to:
        targets = with_publish_to(targets, publish_to)
    work = WorkDir(work_dir)
    context = PlanContext(work=work, offline=offline, llama_cpp_dir=llama_cpp, enforce_gates=enforce_gates)
    return build_plan(targets, context).select(only), work


@app.command()
def validate(targets_file: TargetsArg, no_runner_check: NoRunnerCheckOpt = False) -> None:
    """Check a targets file; print every problem with its file, line and key; refuse a nightly leg that does not
    fit its runner, where the source's size is known without a request."""
    from .errors import ConfigIssue
    from .fit import check_targets
    from .pipeline import load_targets
    from .steps.source import local_source_gaps

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
    from .publish import release_warnings

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
    from .console import reason_text
    from .core.engine import must_run
    from .publish import unlisted_warnings
    from .steps.memory import memory_plan

    with _exits(json_output, steps=[]):
        the_plan, work = _plan(targets_file, work_dir, only, offline, llama_cpp)
        # a step the work dir lacks may be up to date by its repo's record (one request per repo; not --offline)
        todo = must_run(the_plan, work, remote=not (offline or ignore_published), verify=verify_published)
        if not (offline or ignore_published):
            from .steps.source import same_files_notes

            for note in same_files_notes(s for s in the_plan.steps if s.label not in todo):
                typer.echo(f"note: {note}", err=True)
        if github_matrix:
            from .nightly import github_matrix as matrix_of

            matrix, notes = matrix_of(the_plan, todo, every_model=every_model, check=not no_runner_check)
            for note in notes:  # stdout is the matrix
                typer.echo(f"note: {note}", err=True)
            typer.echo(json.dumps(matrix, separators=(",", ":")))
            return
        if not no_runner_check:
            from .fit import check_plan

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

    from .console import make_reporter
    from .core.engine import must_run, run_plan
    from .core.step import BuildOptions
    from .steps.disk import check_disk
    from .steps.memory import check_fits

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
    from . import report as report_mod
    from .store import finite_json

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
    from .core.engine import load_inputs
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
    from .core.engine import load_inputs, run_plan
    from .core.plan import Plan, topological
    from .core.registry import kind_info
    from .core.step import BuildOptions

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
          dataset: Annotated[str, typer.Option("--dataset", help="builtin | file:PATH | "
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

    from .config.schema import EvaluationSettings, check_gate_limit
    from .console import make_reporter
    from .core.engine import run_plan
    from .core.step import BuildOptions, PlanContext
    from .errors import BadInputError
    from .pipeline import plan_adhoc
    from .report import artifact_status, evaluation_line, first_error
    from .store import WorkDir, finite_json

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


report_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build reports.")
app.add_typer(report_app, name="report")
ci_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Nightly builds on GitHub Actions.")
app.add_typer(ci_app, name="ci")


@report_app.command("merge")
def report_merge(
        reports: Annotated[list[Path], typer.Argument(help="Legs' reports: build --json output or a work dir's "
                                                      "reports/*.json.", show_default=False)],
        json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the merged report here.",
                                                      metavar="FILE")] = None,
        matrix: Annotated[Path | None, typer.Option("--matrix", help="The plan's matrix JSON: a leg in it without a "
                                                    "report counts as failed.", metavar="FILE")] = None) -> None:
    """Join a nightly's leg reports: Markdown for $GITHUB_STEP_SUMMARY on stdout; exit 1 when a leg failed."""
    from .report import merge, merged_markdown
    from .store import finite_json

    expected: list[str] = []
    if matrix is not None:
        try:
            expected = [leg["model"] for leg in json.loads(matrix.read_text(encoding="utf-8"))["include"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            typer.echo(f"error: --matrix {matrix}: not a matrix from plan --github-matrix ({exc})", err=True)
            raise typer.Exit(2) from None
    merged = merge(reports, expected)
    if json_out is not None:
        json_out.write_text(json.dumps(finite_json(merged), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    typer.echo(merged_markdown(merged))
    raise typer.Exit(0 if merged["ok"] else 1)


@ci_app.command("init")
def ci_init(targets: Annotated[Path, typer.Option("--targets", help="The targets file the nightly builds.")]
            = Path("targets.yaml"),
            out: Annotated[Path, typer.Option("--out", help="The repository's root: the workflow goes to "
                                              ".github/workflows/nightly.yml under it.")] = Path("."),
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing workflow (and the default "
                                                "constraints file).")] = False,
            install: Annotated[str | None, typer.Option("--install", metavar="SPEC", help=(
                "What the jobs pip-install quantforge from (default: -e . in its own repository, else a git URL "
                "pinned to this quantforge's commit)."))] = None,
            constraints: Annotated[Path | None, typer.Option("--constraints", metavar="FILE", help=(
                "Your own pip constraints file pinning the tools (default: .github/quantforge-constraints.txt, "
                "written with the versions installed here)."))] = None) -> None:
    """Write the nightly workflow (plan -> a build leg per stale model -> one summary) into a repository."""
    from .nightly import write_workflow
    from .pipeline import load_targets

    try:
        load_targets(targets)  # a workflow for a file that does not validate would fail every night
        written = write_workflow(targets, out, force=force, install=install, constraints=constraints)
    except QuantforgeError as exc:
        raise _fail(exc) from None
    for warning in written.install.warnings:
        typer.echo(f"warning: {warning}", err=True)
    pins = ", ".join(f"{name}=={version}" for name, version in written.pins.items())
    typer.echo(f"wrote {written.workflow}: the jobs install {written.install.spec} ({written.install.how})\n"
               f"{'wrote' if written.constraints_written else 'kept'} {written.constraints}: {pins}\nadd an HF_TOKEN "
               "secret with write access (Settings > Secrets and variables > Actions), then commit both files")


@app.command()
def schema(markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print the reference page instead (docs/targets-reference.md).")] = False) -> None:
    """Print the JSON Schema of targets.yaml, for editors' completion (see docs/targets-reference.md)."""
    from .schema_export import reference_markdown, schema_json

    typer.echo(reference_markdown() if markdown else schema_json(), nl=False)


@app.command()
def doctor(json_output: JsonOpt = False, llama_cpp: LlamaCppOpt = None,
           require_gpu: Annotated[bool, typer.Option(
               "--require-gpu", help="Fail (exit 1) unless torch sees a CUDA device and llama.cpp was built with GPU "
                                     "offload: a GPU leg's first step.")] = False) -> None:
    """Report the toolchain: versions, llama.cpp converter, GPU."""
    from .doctor import collect

    info = collect(llama_cpp, require_gpu=require_gpu)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key:<22} {value}")
    if require_gpu and info["gpu required"] != "ok":
        typer.echo(f"error: --require-gpu: {info['gpu required']}", err=True)
    raise typer.Exit(0 if info.get("problems") in (None, "none") else 1)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a cancelled CI job: end as an interrupted build does (workers closed, --json said)


def main() -> None:
    import signal

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    main()
