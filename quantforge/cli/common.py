"""What every `quantforge` command shares: the app, its options, and how library errors become one line and an exit
code (0 ok, 1 build or check failure, 2 bad input), with --json one JSON document on every exit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, QuantforgeError, RunnerTooSmall

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
    from ..config.schema import with_publish_to
    from ..core.step import PlanContext
    from ..pipeline import build_plan, load_targets
    from ..store import WorkDir

    targets = load_targets(targets_file)
    if publish_to:
        targets = with_publish_to(targets, publish_to)
    work = WorkDir(work_dir)
    context = PlanContext(work=work, offline=offline, llama_cpp_dir=llama_cpp, enforce_gates=enforce_gates)
    return build_plan(targets, context).select(only), work
