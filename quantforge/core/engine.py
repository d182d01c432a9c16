"""Runs a plan: cache look-up, atomic outputs, resume, keep-going, and a report.

A step runs only when its output is not in the cache *and* something that must run needs it (a stale final
step, or a stale step feeding one), so deleting a large intermediate does not force a rebuild of what was made
from it. Steps run one at a time: the heavy ones use every core (or the GPU) on their own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from ..errors import BadInputError, DiskFull
from ..store import MANIFEST, NO_SPACE, WorkDir, disk_full, sha256_file
from ..toolchains.worker import close_served_workers
from .plan import Plan, evictable_inputs, file_readers
from .registry import kind_info
from .staleness import published_record, recorded_outputs, stale_reasons, upstream_steps
from .step import BuildOptions, Reason, Step, StepContext, StepOutput

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: Step
    status: str  # built | reused | failed | skipped | not-run | would-build | up-to-date | not-needed
    reasons: list[Reason] = field(default_factory=list)
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # the error's type (GateFailed, VerificationError, ...): what --json calls it
    hint: str | None = None
    log: str | None = None
    output_dir: str | None = None

    @property
    def label(self) -> str:
        return self.step.label

    @property
    def kind(self) -> str:
        return self.step.kind

    @property
    def key(self) -> str:
        return self.step.key

    def to_json(self) -> dict[str, Any]:
        step = self.step
        out: dict[str, Any] = {"label": step.label, "kind": step.kind, "key": step.key, "status": self.status,
                               "model": step.model, "format": step.fmt, "type": step.qtype,
                               "stage": kind_info(step.kind).stage,
                               "reasons": [r.to_json() for r in self.reasons], "seconds": self.seconds,
                               "data": self.data, "error": self.error, "error_kind": self.error_kind, "hint": self.hint,
                               "log": self.log,
                               "output_dir": self.output_dir}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}


class Reporter(Protocol):
    def begin(self, total: int, dry_run: bool) -> None: ...
    def step_started(self, step: Step, reasons: list[Reason]) -> None: ...
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


def must_run(plan: Plan, work: WorkDir, *, remote: bool = True, recorded: dict[str, dict[str, Any]] | None = None,
             verify: bool = False) -> dict[str, list[Reason]]:
    """label -> reasons, for every step that has to run (see the module docstring). `remote`: a step the work dir
    lacks is up to date when its destination's record carries its key, and serves the steps that read only its
    data when the record keeps it (`recorded`, from core/staleness.recorded_outputs unless given). `verify`:
    published copies are compared by content, not only by size."""
    if recorded is None:
        recorded = recorded_outputs(plan.steps) if remote else {}
    dependents: dict[int, list[tuple[Step, str | None]]] = {id(s): [] for s in plan.steps}
    for step in plan.steps:
        for role, dep in step.inputs.items():
            dependents[id(dep)].append((step, role))
        for dep in step.after:  # must have run first: as good as read
            dependents[id(dep)].append((step, None))
    needed: dict[str, list[Reason]] = {}
    for step in reversed(plan.steps):
        reasons = stale_reasons(step, work, remote=remote, verify=verify)
        if not reasons:
            continue
        users = dependents[id(step)]
        # an output evicted with its manifest kept, or one a destination recorded, serves the users that read only
        # its data (Step.data_only)
        kept = any(role in u.data_only for u, role in users) and (
            step.key in recorded or work.evicted(step.kind, step.key) is not None)
        if not users or any(u.label in needed and not (kept and role in u.data_only) for u, role in users):
            needed[step.label] = reasons
    return needed


# Below this much free space, a failed step is taken to have failed for want of it (external tools report a
# full disk in many ways: a bare exit code, a progress bar cut short).
NEARLY_FULL_BYTES = 16 << 20


def _out_of_space(exc: Exception, step: Step, inputs: dict[str, StepOutput], staged: Path) -> DiskFull | None:
    """A DiskFull naming the step, the device and about what it needs, when `exc` came from a full disk."""
    if isinstance(exc, DiskFull):
        return None
    no_space = isinstance(exc, OSError) and exc.errno in NO_SPACE
    try:
        no_space = no_space or shutil.disk_usage(staged).free < NEARLY_FULL_BYTES
    except OSError:
        pass
    if not no_space:
        return None
    written = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
    largest_input = max((sum(f.get("size", 0) for f in out.files().values()) for out in inputs.values()), default=0)
    return disk_full(staged, max(written, largest_input), step.label)


def as_json_data(data: Any) -> dict[str, Any]:
    """What a step returns, as the JSON its manifest records: a dict, or a typed result with to_json()."""
    return data.to_json() if hasattr(data, "to_json") else data


def load_inputs(step: Step, work: WorkDir, *, made_first: Collection[str] = (),
                recorded: dict[str, dict[str, Any]] | None = None) -> dict[str, StepOutput]:
    """The committed outputs of a step's inputs (for a role it reads only the data of, what eviction kept of one,
    or what a destination recorded of it); BadInputError naming the first that has none. `made_first`: labels of
    inputs to leave out (a run makes them)."""
    inputs = {}
    for role, dep in step.inputs.items():
        if dep.label in made_first:
            continue
        manifest = work.lookup(dep.kind, dep.key)
        if manifest is None and role in step.data_only:
            manifest = work.evicted(dep.kind, dep.key) or (recorded or {}).get(dep.key)
        if manifest is None:
            raise BadInputError(f"{step.label}: {dep.label} has no output in {work.root} (not built, or it "
                                "failed); run quantforge build")
        inputs[role] = StepOutput(work.step_dir(dep.kind, dep.key), manifest)
    return inputs


def upstream_outputs(step: Step, work: WorkDir, recorded: dict[str, dict[str, Any]]) -> dict[str, StepOutput]:
    """label -> the output (built, evicted or recorded) of every step upstream of `step` that has one."""
    out = {}
    for label, dep in upstream_steps(step).items():
        manifest = work.lookup(dep.kind, dep.key) or work.evicted(dep.kind, dep.key) or recorded.get(dep.key)
        if dep is not step and manifest is not None:
            out[label] = StepOutput(work.step_dir(dep.kind, dep.key), manifest)
    return out


def run_plan(plan: Plan, work: WorkDir, options: BuildOptions, reporter: Reporter) -> BuildReport:
    report = BuildReport(str(plan.targets.path), str(work.root), time.time(), [], dry_run=options.dry_run)
    try:
        with work.locked():
            work.clear_debris()
            recorded = recorded_outputs(plan.steps) if not options.offline else {}
            todo = must_run(plan, work, remote=not options.offline, recorded=recorded,
                            verify=options.verify_published)
            reporter.begin(len(plan.steps), options.dry_run)
            failed: set[str] = set()
            built_here: set[str] = set()
            stop = False
            evictor = Evictor(plan, work) if options.evict and not options.dry_run else None
            for step in plan.steps:
                # two labels may share a key (two models with one source): the second reuses what the first built
                if step.label not in todo or step.key in built_here:
                    cached = work.lookup(step.kind, step.key)
                    record = published_record(step) if cached is None and not options.offline else None
                    if record is not None and record.key == step.key:  # published by an earlier build, elsewhere
                        result = StepResult(step, "up-to-date" if options.dry_run else "reused", data=dict(record.data))
                    elif cached is None and step.key in recorded:  # its data is read from a destination's record
                        result = StepResult(step, "up-to-date" if options.dry_run else "reused",
                                            data=dict(recorded[step.key].get("data") or {}))
                    elif cached is None:  # stale, but everything made from it is cached: not needed
                        result = StepResult(step, "not-needed")
                    else:
                        result = StepResult(step, "up-to-date" if options.dry_run else "reused",
                                            data=cached.get("data", {}),
                                            output_dir=str(work.step_dir(step.kind, step.key)))
                elif options.dry_run:
                    result = StepResult(step, "would-build", reasons=todo[step.label])
                elif stop:
                    result = StepResult(step, "not-run", reasons=[Reason("stopped")])
                elif blocked := [d.label for d in (*step.inputs.values(), *step.after) if d.label in failed]:
                    failed.add(step.label)
                    result = StepResult(step, "skipped", reasons=[Reason("input-failed", new=blocked)])
                else:
                    reporter.step_started(step, todo[step.label])
                    result = _run_step(step, todo[step.label], work, options,
                                       lambda text, step=step: reporter.step_progress(step, text), recorded)
                    if result.status == "failed":
                        failed.add(step.label)
                        stop = not options.keep_going
                    else:
                        built_here.add(step.key)
                report.results.append(result)
                reporter.step_finished(result)
                if evictor is not None:
                    evictor.done(step)
            report.finished = time.time()
            reporter.end()
    finally:
        close_served_workers()  # a worker serving this build's steps ends with it
    return report


class Evictor:
    """`build --evict`: deletes an evictable output (core/registry.py) once every step of this plan that reads its
    files has a result (a step reading only its data does not count: Step.data_only), so that a leg holds the F16
    intermediate only until its last quantization and each artifact only until it is published (to a folder) or
    uploaded (to the Hub, ahead of the commit). A later build that needs one again rebuilds it (a missing output
    is a miss)."""

    def __init__(self, plan: Plan, work: WorkDir):
        self.work = work
        self.readers = file_readers(plan.steps)
        self.finished: set[str] = set()
        self.freed_bytes = 0

    def done(self, step: Step) -> None:
        self.finished.add(step.label)
        for dep in evictable_inputs(step, self.readers, self.finished):
                self.freed_bytes += self.work.evict(dep.kind, dep.key)


def _run_step(step: Step, reasons: list[Reason], work: WorkDir, options: BuildOptions,
              progress: Callable[[str], None] = lambda _text: None,
              recorded: dict[str, dict[str, Any]] | None = None) -> StepResult:
    log_path = work.log_path(step.label)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    why = json.dumps([r.to_json() for r in reasons], ensure_ascii=False, default=str)
    log_path.write_text(f"# {step.label} (key {step.key[:16]})\n# why: {why}\n")
    recorded = recorded or {}
    inputs = load_inputs(step, work, recorded=recorded)  # all built or recorded: must_run ran what they needed
    started = time.perf_counter()
    log.info("running %s (%s)", step.label, why)
    result = StepResult(step, "built", reasons=reasons, log=str(log_path))
    try:
        with work.staging(step.kind, step.key) as staged:
            ctx = StepContext(step, staged, log_path, inputs, options,
                              lambda text: progress(f"{text} (log: {log_path})"),
                              lambda: upstream_outputs(step, work, recorded))
            try:
                data = as_json_data(kind_info(step.kind).run(step, ctx))
            except Exception as exc:
                full = _out_of_space(exc, step, inputs, staged)
                if full is None:
                    raise
                raise full from exc
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
        result.error = str(exc) or type(exc).__name__  # a bare exception still says what it was
        result.error_kind = type(exc).__name__
        result.hint = getattr(exc, "hint", None)
        result.seconds = round(time.perf_counter() - started, 3)
    return result
