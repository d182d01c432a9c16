"""Step kinds, registered where they are implemented.

    @step_kind("gguf.quantize", version="1", stage="artifact")
    def run_quantize(step: Step, ctx: StepContext) -> dict: ...

A kind's version is part of every key of that kind: bump it when the implementation changes what it produces,
and exactly those outputs (and what was made from them) become stale. A kind whose effect lives outside the
work dir (publishing) may give a `check` that says whether a cached output still holds, and a `published` look-up
that reads the record the destination keeps (so that a run without the work dir can tell it is up to date). A kind
whose output is large and read only within one build (the F16 intermediate, the artifacts) says `evict=True`:
`build --evict` deletes such an output once every step of the build that reads it has run.

What a step of a kind costs (memory, disk, time) is said by the kind too, as `Estimates`: the memory, disk and
runner-fit plans ask the registry and name no kind, so a new format's steps are counted as soon as they exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (step, context) -> the step's data (a dict, or a typed result with to_json()); kept loose here because the
# step contract (core/step.py) builds on this module
RunFn = Callable[..., Any]
# (step, cached manifest, verify) -> the Reasons why the cached output no longer holds (empty: it does); `verify`:
# the user asked for the thorough check (build --verify-published) over the cheap one
CheckFn = Callable[..., Any]
PublishedFn = Callable[..., Any]  # (step, verify) -> the destination's record (core.step.Published)

MemoryFn = Callable[..., Any]  # (step, source_dir, host, gpu) -> steps.memory.StepMemory
SizeFn = Callable[..., int]  # (step, steps.disk.SourceSize) -> bytes
SecondsFn = Callable[..., float]  # (step, SourceSize, cores, gpu: bool) -> seconds of work, besides a step's start
CopyFn = Callable[..., Any]  # (step, SourceSize) -> (folder, bytes) or None
FloorFn = Callable[..., tuple[int, str]]  # (step, SourceSize) -> (bytes, how it runs, in words)


@dataclass(frozen=True)
class Estimates:
    """What a step of a kind costs, known before anything runs (steps/memory.py, steps/disk.py,
    steps/duration.py, fit.py ask these). An unset hook: the kind costs nothing worth counting."""

    memory: MemoryFn | None = None  # its peak memory, from the source's config and safetensors headers
    output_bytes: SizeFn | None = None  # what its output adds to the disk
    scratch_bytes: SizeFn | None = None  # what it writes and deletes again before it ends
    copied_bytes: CopyFn | None = None  # what it copies into a folder outside the work dir, and where
    seconds: SecondsFn | None = None  # how long its work takes
    # its host memory when the source's shapes are not known yet (a runner's size is chosen before the fetch)
    host_floor: FloorFn | None = None


# What a step is in an artifact's life; the report groups an artifact's steps by these. "extra": a file a format
# publishes once per repo, beside its artifacts (the importance matrix). "publish": the publish step and, to the
# Hub, each artifact's upload ahead of it (what `quantforge push` runs).
STAGES = ("", "artifact", "verify", "evaluate", "gate", "extra", "publish")


@dataclass(frozen=True)
class StepKind:
    kind: str
    run: RunFn
    version: str
    stage: str = ""
    check: CheckFn | None = None
    published: PublishedFn | None = None
    evict: bool = False
    estimates: Estimates = Estimates()


_KINDS: dict[str, StepKind] = {}


class UnknownStepKind(LookupError):
    """A step of a kind nobody registered: its module was not imported (a programming error)."""


def register(kind: str, run: RunFn, *, version: str = "0", stage: str = "", check: CheckFn | None = None,
             published: PublishedFn | None = None, evict: bool | None = None,
             estimates: Estimates | None = None) -> None:
    if stage not in STAGES:
        raise ValueError(f"{kind}: unknown stage {stage!r}")
    existing = _KINDS.get(kind)
    if existing is not None and existing.run is not run and existing.run.__module__ != run.__module__:
        raise ValueError(f"step kind {kind!r} is registered twice ({existing.run.__module__}, {run.__module__})")
    # an artifact's bytes are needed until it is published, not after: evictable unless a kind says otherwise
    _KINDS[kind] = StepKind(kind, run, version, stage, check, published,
                            stage == "artifact" if evict is None else evict, estimates or Estimates())


def step_kind(kind: str, *, version: str, stage: str = "", check: CheckFn | None = None,
              published: PublishedFn | None = None, evict: bool | None = None,
              estimates: Estimates | None = None) -> Callable[[RunFn], RunFn]:
    """Register the decorated function as the implementation of `kind`."""

    def decorate(run: RunFn) -> RunFn:
        register(kind, run, version=version, stage=stage, check=check, published=published, evict=evict,
                 estimates=estimates)
        return run

    return decorate


def kind_info(kind: str) -> StepKind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise UnknownStepKind(f"no step kind {kind!r} is registered (registered: {', '.join(sorted(_KINDS))})") \
            from None


def kind_version(kind: str) -> str:
    return kind_info(kind).version


def registered_kinds() -> dict[str, StepKind]:
    return dict(_KINDS)
