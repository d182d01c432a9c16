"""Runs a plan: cache look-up, atomic outputs, resume, keep-going, and a report.

A step runs only when its output is not in the cache *and* something that must run needs it (a stale final
step, or a stale step feeding one), so deleting a large intermediate does not force a rebuild of what was made
from it. Steps run one at a time: the heavy ones use every core (or the GPU) on their own.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .errors import BadInputError
from .plan import Plan, Step, stale_reasons
from .runners import runner_for
from .store import MANIFEST, WorkDir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    keep_going: bool = False
    dry_run: bool = False
    threads: int | None = None
    llama_cpp_dir: str | None = None


@dataclass(frozen=True)
class StepOutput:
    dir: Path
    manifest: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return self.manifest.get("data", {})

    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    def file(self, name: str) -> Path:
        return self.dir / name


@dataclass
class StepContext:
    step: Step
    out_dir: Path
    log_path: Path
    inputs: dict[str, StepOutput]
    options: BuildOptions
    # a long step says how far it is ("layer 3/30"); the console shows it next to the step's label
    progress: Callable[[str], None] = lambda _text: None


@dataclass
class StepResult:
    label: str
    kind: str
    key: str
    status: str  # built | reused | failed | skipped | not-run | would-build | up-to-date | not-needed
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    hint: str | None = None
    log: str | None = None
    output_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


class Reporter(Protocol):
    def begin(self, total: int, dry_run: bool) -> None: ...
    def step_started(self, step: Step, reasons: list[str]) -> None: ...
    def step_progress(self, step: Step, text: str) -> None: ...
    def step_finished(self, result: StepResult) -> None: ...
    def end(self) -> None: ...


@dataclass
class BuildReport:
    targets: str
    work_dir: str
    started: float
    results: list[StepResult]
    finished: float = 0.0
    dry_run: bool = False

    @property
    def failures(self) -> list[StepResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures and not any(r.status in ("skipped", "not-run") for r in self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "quantforge": __version__,
            "targets": self.targets,
            "work_dir": self.work_dir,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(self.finished - self.started, 3),
            "counts": self.counts(),
            "steps": [r.to_json() for r in self.results],
        }


def must_run(plan: Plan, work: WorkDir) -> dict[str, list[str]]:
    """label -> reasons, for every step that has to run (see the module docstring)."""
    dependents: dict[int, list[Step]] = {id(s): [] for s in plan.steps}
    for step in plan.steps:
        for dep in step.inputs.values():
            dependents[id(dep)].append(step)
    needed: dict[str, list[str]] = {}
    for step in reversed(plan.steps):
        reasons = stale_reasons(step, work)
        if not reasons:
            continue
        users = dependents[id(step)]
        if not users or any(u.label in needed for u in users):
            needed[step.label] = reasons
    return needed


def load_inputs(step: Step, work: WorkDir) -> dict[str, StepOutput]:
    """The committed outputs of a step's inputs; BadInputError naming the first that has none."""
    inputs = {}
    for role, dep in step.inputs.items():
        manifest = work.lookup(dep.kind, dep.key)
        if manifest is None:
            raise BadInputError(f"{step.label}: {dep.label} has no output in {work.root} (not built, or it "
                                "failed); run quantforge build")
        inputs[role] = StepOutput(work.step_dir(dep.kind, dep.key), manifest)
    return inputs


def run_plan(plan: Plan, work: WorkDir, options: BuildOptions, reporter: Reporter) -> BuildReport:
    report = BuildReport(str(plan.targets.path), str(work.root), time.time(), [], dry_run=options.dry_run)
    with work.locked():
        work.clear_debris()
        todo = must_run(plan, work)
        reporter.begin(len(plan.steps), options.dry_run)
        failed: set[str] = set()
        built_here: set[str] = set()
        stop = False
        for step in plan.steps:
            # two labels may share a key (two models with one source): the second reuses what the first built
            if step.label not in todo or step.key in built_here:
                cached = work.lookup(step.kind, step.key)
                if cached is None:  # stale, but everything made from it is cached: not needed
                    result = StepResult(step.label, step.kind, step.key, "not-needed")
                else:
                    result = StepResult(step.label, step.kind, step.key,
                                        "up-to-date" if options.dry_run else "reused", data=cached.get("data", {}),
                                        output_dir=str(work.step_dir(step.kind, step.key)))
            elif options.dry_run:
                result = StepResult(step.label, step.kind, step.key, "would-build", reasons=todo[step.label])
            elif stop:
                result = StepResult(step.label, step.kind, step.key, "not-run", reasons=["the build stopped"])
            elif blocked := [d.label for d in step.inputs.values() if d.label in failed]:
                failed.add(step.label)
                result = StepResult(step.label, step.kind, step.key, "skipped",
                                    reasons=[f"input failed: {', '.join(blocked)}"])
            else:
                reporter.step_started(step, todo[step.label])
                result = _run_step(step, todo[step.label], work, options,
                                   lambda text, step=step: reporter.step_progress(step, text))
                if result.status == "failed":
                    failed.add(step.label)
                    stop = not options.keep_going
                else:
                    built_here.add(step.key)
            report.results.append(result)
            reporter.step_finished(result)
        report.finished = time.time()
        reporter.end()
    return report


def _run_step(step: Step, reasons: list[str], work: WorkDir, options: BuildOptions,
              progress: Callable[[str], None] = lambda _text: None) -> StepResult:
    log_path = work.log_path(step.label)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"# {step.label} (key {step.key[:16]})\n# why: {'; '.join(reasons)}\n")
    inputs = load_inputs(step, work)  # all built: must_run ran what they needed
    started = time.perf_counter()
    log.info("running %s (%s)", step.label, "; ".join(reasons))
    result = StepResult(step.label, step.kind, step.key, "built", reasons=reasons, log=str(log_path))
    try:
        with work.staging(step.kind, step.key) as staged:
            ctx = StepContext(step, staged, log_path, inputs, options,
                              lambda text: progress(f"{text} (log: {log_path})"))
            data = runner_for(step.kind)(step, ctx)
            files = {p.relative_to(staged).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(staged.rglob("*")) if p.is_file() and p.name != MANIFEST}
            seconds = time.perf_counter() - started
            manifest = {
                **step.fingerprint(),
                "key": step.key,
                "label": step.label,
                "quantforge": __version__,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(seconds, 3),
                "files": files,
                "data": data,
            }
            final = work.commit(staged, step.kind, step.key, manifest)
        work.record_state(step.label, {**step.fingerprint(), "key": step.key})
        result.seconds = round(seconds, 3)
        result.data = data
        result.output_dir = str(final)
    except Exception as exc:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write("\n# quantforge: step failed\n")
            traceback.print_exc(file=f)
        result.status = "failed"
        result.error = str(exc)
        result.hint = getattr(exc, "hint", None)
        result.seconds = round(time.perf_counter() - started, 3)
    return result
