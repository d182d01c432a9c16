"""Does a nightly leg fit its runner? Each leg's estimated peak disk, memory and time against what its runner
offers (config/runner.py), before anything is installed: a leg that cannot fit is refused with the figures and
the runner to declare, rather than failing hours later on a full disk, an out-of-memory kill or the job limit.

    disk    the build's peak with eviction on one disk (steps/disk.py), plus the toolchain it installs first
    memory  the largest step's peak (steps/memory.py) on the runner's memory: the torch passes stream layer by
            layer when the whole model does not fit, GPTQModel never does. Known from the source's config and
            safetensors headers once they are on the planning machine (a local source, a Hub source in the
            HF cache); before that, GPTQModel's whole fp16 model is the one figure known
    time    steps/duration.py with the runner's cores (and GPU), plus a cold install

A size the runner does not declare (a self-hosted label without sizes) is not checked, and the leg says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .config.runner import RunnerSize, RunnerSpec
from .config.schema import ModelTarget, Targets
from .core.plan import Plan
from .core.registry import kind_info
from .core.step import PlanContext, Reason, Step
from .errors import RunnerTooSmall, SourceError, ToolchainError
from .figures import format_duration, format_size
from .steps.disk import SourceSize, disk_use
from .steps.duration import LegTime, leg_time
from .steps.memory import estimate_step, is_heavy
from .toolchains.memory import HostMemory

# What installing the toolchain takes from the disk: torch's CPU wheel, llama.cpp, GPTQModel and pip's cache;
# on a GPU, CUDA torch's wheels (several GB). Rough, from the installs of this project's machines.
INSTALL_BYTES = {False: 3 * 10**9, True: 10 * 10**9}
# What the system and the runner's agent keep of a runner's memory
SYSTEM_BYTES = 1 * 10**9
_NICE_GB = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Leg:
    """One model's nightly leg: its steps, and which of them it runs."""

    model: ModelTarget
    steps: tuple[Step, ...]  # every step of the model, in plan order
    run: tuple[str, ...]  # labels of the steps it runs
    stale: tuple[Step, ...]  # those that are stale ([] when forced with --all)


@dataclass(frozen=True)
class LegFit:
    leg: Leg
    size: RunnerSize
    disk: int  # the build's peak
    install_disk: int
    memory: int | None
    memory_how: str
    time: LegTime | None  # None: the runner's cores are unknown
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    fix: str | None

    @property
    def runner(self) -> RunnerSpec:
        return self.leg.model.runner

    def error_line(self) -> str:
        return (f"leg {self.leg.model.name} does not fit its runner {_labels(self.runner)} ({self.size.where}): "
                + "; ".join(self.problems) + (f"; fix: {self.fix}" if self.fix else ""))


def legs_of(plan: Plan, todo: dict[str, list[Reason]], *, every_model: bool = False) -> list[Leg]:
    """A leg per model with a stale step (every model with `every_model`), in the targets' order."""
    legs = []
    for model in plan.targets.models:
        steps = tuple(s for s in plan.steps if s.model == model.name)
        stale = tuple(s for s in steps if s.label in todo)
        if steps and (stale or every_model):
            legs.append(Leg(model, steps, tuple(s.label for s in (stale or steps)), stale))
    return legs


def fit_leg(leg: Leg) -> LegFit:
    size = leg.model.runner.size()
    problems: list[str] = []
    notes: list[str] = []
    source = next((s for s in leg.steps if s.kind == "source"), None)
    if source is None or not source.local.get("files"):
        notes.append("the source's file sizes are not known here, so neither are the leg's disk, memory or time")
    uses = disk_use(leg.steps, leg.run, work_root=Path(".quantforge"), evict=True, one_disk=True)
    disk = max((u.peak_bytes for u in uses), default=0)
    install = INSTALL_BYTES[size.gpu]
    if size.disk is None:
        notes.append("disk not checked: the runner declares none (runner: {labels: [...], disk: 100GB})")
    elif disk + install > size.disk:
        problems.append(f"disk about {format_size(disk + install)} (the build's peak {format_size(disk)} + "
                        f"{format_size(install)} to install the toolchain) > {format_size(size.disk)} free")
    memory, how = leg_memory([s for s in leg.steps if s.label in leg.run], size)
    usable = None if size.memory is None else size.memory - SYSTEM_BYTES
    if usable is None:
        notes.append("memory not checked: the runner declares none (runner: {labels: [...], memory: 64GB})")
    elif memory is not None and memory > usable:
        problems.append(f"memory about {format_size(memory)} ({how}) > {format_size(usable)} usable of "
                        f"{format_size(size.memory or 0)}")
    elif memory is None:
        notes.append(f"memory not checked: {how}")
    time = None if size.cores is None else leg_time(leg.steps, leg.run, size.cores, size.gpu)
    if time is None:
        notes.append(f"time not checked: the runner declares no cores (runner: {{labels: [...], cores: 16}}); "
                     f"it may run {format_duration(size.timeout * 60)}")
    elif time.seconds > size.timeout * 60:
        problems.append(f"time about {format_duration(time.seconds)} (longest step {time.largest}; on "
                        f"{size.cores} cores{' and a GPU' if size.gpu else ''}) > the "
                        f"{format_duration(size.timeout * 60)} it may run")
    fix = _fix(leg.model.runner, size, disk + install, memory, time) if problems else None
    return LegFit(leg, size, disk, install, memory, how, time, tuple(problems), tuple(notes), fix)


def leg_memory(steps: Iterable[Step], size: RunnerSize) -> tuple[int | None, str]:
    """The largest step's expected host memory on a runner of `size` (unknown memory: the least it needs, the
    torch passes streamed), and how that step runs."""
    available = 0 if size.memory is None else size.memory - SYSTEM_BYTES
    host = HostMemory(total=size.memory or 0, available=max(available, 0), cgroup=None)
    gpu = None if size.gpu_memory is None else (size.gpu_memory, size.gpu_memory)
    steps = list(steps)
    known = [e for e in (estimate_step(s, host, gpu) for s in steps if is_heavy(s))
             if e.host_bytes is not None]
    if known:
        top = max(known, key=lambda e: e.host_bytes or 0)
        return top.host_bytes, f"{top.label}: {top.how}"
    source = next((s for s in steps if s.kind == "source"), None) or \
        next((d for s in steps for d in s.inputs.values() if d.kind == "source"), None)
    # a step that holds the whole model says the least it needs from the source's size alone
    floors = [(floor(s, SourceSize.of(source)), s) for s in steps
              if (floor := kind_info(s.kind).estimates.host_floor) is not None] \
        if source is not None and source.local.get("files") else []
    if floors:
        (least, how), step = max(floors, key=lambda f: f[0][0])
        return least, f"{step.label}: {how}"
    return None, ("unknown until the source's config and safetensors headers are here (a Hub source: once "
                  "fetched); the torch passes stream layer by layer when memory is short")


def _fix(runner: RunnerSpec, size: RunnerSize, disk: int, memory: int | None, time: LegTime | None) -> str:
    """A runner declaration that would fit, e.g. `runner: {labels: [...], memory: 32GB, timeout: 12h}`."""
    wanted: list[str] = []
    cores = size.cores
    if time is not None and time.seconds > size.timeout * 60 and cores:
        work = time.seconds - time.install_seconds
        budget = (size.timeout * 60 - time.install_seconds) * 0.8
        more = 2 ** math.ceil(math.log2(max(cores * work / max(budget, 1), cores + 1)))
        if more <= 64:
            wanted.append(f"cores: {more}")
        else:  # more cores than a runner has: more time instead (a self-hosted runner may run 5 days)
            hours = math.ceil(1.3 * time.seconds / 3600)
            wanted.append(f"timeout: {hours}h" if hours <= 48 else f"timeout: {min(5, math.ceil(hours / 24))}d")
    if memory is not None and size.memory is not None and memory > size.memory - SYSTEM_BYTES:
        wanted.append(f"memory: {_nice_gb(memory + SYSTEM_BYTES)}GB")
    if size.disk is not None and disk > size.disk:
        wanted.append(f"disk: {10 * math.ceil(1.2 * disk / 1e10)}GB")
    labels = "[your-larger-runner]" if runner.hosted else _labels(runner)
    return f"declare a larger runner: runner: {{labels: {labels}, {', '.join(wanted)}}}" + \
        (" (or one with a GPU: gpu_memory: 24GB)" if time is not None and not size.gpu and
         time.seconds > size.timeout * 60 else "")


def _nice_gb(n: int) -> int:
    return next((gb for gb in _NICE_GB if gb * 10**9 >= n), math.ceil(n / 10**9))


def _labels(runner: RunnerSpec) -> str:
    return f"[{', '.join(runner.labels)}]"


def refuse_unfit(fits: Iterable[LegFit]) -> None:
    """Raise RunnerTooSmall with one line per leg that does not fit."""
    lines = [f.error_line() for f in fits if f.problems]
    if lines:
        raise RunnerTooSmall(lines)


def check_plan(plan: Plan, todo: dict[str, list[Reason]]) -> list[LegFit]:
    """`plan`: refuse (RunnerTooSmall) a leg, the model's stale steps, that does not fit its runner."""
    fits = [fit_leg(leg) for leg in legs_of(plan, todo)]
    refuse_unfit(fits)
    return fits


def check_targets(targets: Targets, work_dir: Path) -> list[str]:
    """`validate`: refuse a model's leg, built from scratch, that does not fit its runner; the notes on what
    could not be checked. Plans offline (no request), with the work dir's memo of local sources' hashes."""
    from .store import WorkDir

    fits, notes = fit_targets(targets, PlanContext(work=WorkDir(work_dir), offline=True))
    refuse_unfit(fits)
    return notes + [f"{f.leg.model.name} on {f.runner.runs_on}: {note}" for f in fits for note in f.notes]


def fit_targets(targets: Targets, context: PlanContext) -> tuple[list[LegFit], list[str]]:
    """`validate`: every model's leg as a fresh runner builds it (every step), for the models whose sizes are
    known without a request: local sources, and Hub sources in the local HF cache (`context` is offline).
    Returns the fits and a note for each model not checked."""
    from .pipeline import build_plan

    fits, notes = [], []
    for model in targets.models:
        try:
            plan = build_plan(Targets(targets.path, (model,)), context)
        except (SourceError, ToolchainError) as exc:
            notes.append(f"{model.name}: runner fit not checked ({exc}); plan checks it")
            continue
        [leg] = legs_of(plan, {}, every_model=True)
        fits.append(fit_leg(leg))
    return fits, notes
