"""How a build shows itself: a rich progress bar on a terminal, plain lines in CI logs, nothing but failures
under --json (whose stdout is the report)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .core.engine import StepResult
from .core.step import Reason, Step

_MARKS = {"built": "✓", "reused": "·", "up-to-date": "·", "not-needed": "·", "would-build": "→", "failed": "✗",
          "skipped": "-", "not-run": "-"}


def reason_text(reason: Reason) -> str:
    """One reason, as a person reads it: `params.type: 'Q8_0' -> 'Q6_K'`, `input source changed`."""
    match reason.what:
        case "never-built":
            return "never built"
        case "output-missing":
            return "output missing from the work dir"
        case "params":
            return f"params.{reason.key}: {reason.old!r} -> {reason.new!r}"
        case "tools":
            return f"tools.{reason.key}: {reason.old} -> {reason.new}"
        case "input":
            return f"input {reason.key} changed"
        case "inputs":
            return "inputs changed"
        case "published":
            return f"published copy changed or missing: {', '.join(reason.new or [])}"
        case "unpublished":
            return f"no build record at {reason.new}"  # not published, by an older quantforge, or cut short
        case "since-published":
            return f"{reason.key}: {reason.new} since published"
        case "input-failed":
            return f"input failed: {', '.join(reason.new or [])}"
        case "stopped":
            return "the build stopped"
        case "redescribe":
            return f"output made by an older quantforge, without its {reason.new}; described again"
        case "moved":
            return f"same content, now at {reason.new}"
        case "published-changed":
            return f"published file changed: {reason.key} ({_changed(reason.old, reason.new)})"
    return reason.what


def _changed(recorded: object, found: object) -> str:
    if isinstance(recorded, int) and isinstance(found, int):
        return f"{found} bytes, {recorded} published"
    return f"sha256 {str(found)[:12]}…, {str(recorded)[:12]}… published"


def reasons_text(reasons: list[Reason]) -> str:
    return "; ".join(reason_text(r) for r in reasons)


def _describe(result: StepResult) -> str:
    text = f"{_MARKS.get(result.status, '?')} {result.status:<11} {result.label}"
    if result.status == "built":
        text += f" ({result.seconds:.1f} s)"
    if result.status in ("would-build", "skipped", "not-run") and result.reasons:
        text += f"  [{reasons_text(result.reasons)}]"
    if result.status == "failed":
        text += f"\n    {result.error}"
        if result.hint:
            text += f"\n    hint: {result.hint}"
        if result.log:
            text += f"\n    log: {result.log}"
    return text


class PlainReporter:
    """One line per step that did something (and one per failure) — for CI logs."""

    PROGRESS_EVERY = 30.0  # seconds between progress lines of one long step

    def __init__(self, stream: TextIO | None = None, only_failures: bool = False):
        self.stream = stream or sys.stderr
        self.only_failures = only_failures
        self.done = 0
        self.total = 0
        self._last_progress = 0.0

    def begin(self, total: int, dry_run: bool) -> None:
        self.total = total

    def step_started(self, step: Step, reasons: list[Reason]) -> None:
        if not self.only_failures:
            print(f"[{self.done + 1}/{self.total}] running {step.label}: {reasons_text(reasons)}",
                  file=self.stream, flush=True)
        self._last_progress = time.monotonic()

    def step_progress(self, step: Step, text: str) -> None:
        now = time.monotonic()
        if not self.only_failures and now - self._last_progress >= self.PROGRESS_EVERY:
            self._last_progress = now
            print(f"[{self.done + 1}/{self.total}]   {step.label}: {text}", file=self.stream, flush=True)

    def step_finished(self, result: StepResult) -> None:
        self.done += 1
        if result.status == "failed" or (not self.only_failures and result.status not in ("reused", "not-needed")):
            print(f"[{self.done}/{self.total}] {_describe(result)}", file=self.stream, flush=True)

    def end(self) -> None:
        pass


class RichReporter:
    """A progress bar with the running step; finished steps scroll above it."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self.task = None

    def begin(self, total: int, dry_run: bool) -> None:
        self.progress.start()
        self.task = self.progress.add_task("planning", total=total)

    def step_started(self, step: Step, reasons: list[Reason]) -> None:
        self.progress.update(self.task, description=f"{step.label}")

    def step_progress(self, step: Step, text: str) -> None:
        self.progress.update(self.task, description=f"{step.label} [dim]{text}[/]")

    def step_finished(self, result: StepResult) -> None:
        if result.status not in ("reused", "not-needed"):
            style = {"failed": "red", "built": "green", "would-build": "yellow"}.get(result.status, "dim")
            self.console.print(_describe(result), style=style, highlight=False)
        self.progress.advance(self.task)

    def end(self) -> None:
        self.progress.stop()


def make_reporter(json_output: bool) -> PlainReporter | RichReporter:
    err = Console(stderr=True)
    if json_output:
        return PlainReporter(only_failures=True)
    if err.is_terminal:
        return RichReporter(err)
    return PlainReporter()
