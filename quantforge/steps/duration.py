"""How long a build's steps take, roughly: enough to tell before a nightly leg starts whether it can finish
within its runner's job limit (6 hours on GitHub's hosted runners), and nothing more. The figures are a model,
not a promise: within a factor of two for the CPU figures, and a guess for a GPU.

Each step kind estimates its work (core.registry.Estimates.seconds) from the throughputs in steps/rates.py and
its format's own; a step adds STEP_SECONDS besides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.plan import upstream_of_kind
from ..core.registry import kind_info
from ..core.step import Step
from ..figures import format_duration
from .disk import SourceSize

STEP_SECONDS = 10.0  # a process start, imports, a tokenizer: what every step costs besides its work
# pip's cache is cold on a fresh runner (or after a new pin): compiling llama.cpp takes 5-15 minutes on 2-4
# cores (README "Set-up"); with CUDA, longer
INSTALL_SECONDS = {False: 20 * 60, True: 40 * 60}


@dataclass(frozen=True)
class LegTime:
    seconds: float  # install + every step
    largest: str  # the step that takes longest, and how long
    install_seconds: float


def step_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    """About how long `step` takes on `cores` CPU cores (and a GPU when `gpu`), as its kind estimates its work."""
    estimate = kind_info(step.kind).estimates.seconds
    return STEP_SECONDS + (estimate(step, size, cores, gpu) if estimate is not None else 0.0)


def leg_time(steps: Sequence[Step], run: Iterable[str], cores: int, gpu: bool) -> LegTime:
    """The time of the steps in `run` (labels), one after another as a build runs them, plus a cold install."""
    todo = set(run)
    sizes: dict[str, SourceSize] = {}
    timed: list[tuple[float, str]] = []
    for step in steps:
        source = upstream_of_kind(step, "source")
        if step.label not in todo or source is None:
            continue
        size = sizes.setdefault(source.label, SourceSize.of(source))
        timed.append((step_seconds(step, size, cores, gpu), step.label))
    install = INSTALL_SECONDS[gpu]
    top = max(timed, default=(0.0, ""))
    return LegTime(install + sum(s for s, _ in timed), f"{top[1]} {format_duration(top[0])}", install)

