"""A plan: every step of a build in dependency order, and the selection `--only` makes of it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BadInputError
from .registry import kind_info
from .step import Step

if TYPE_CHECKING:
    from ..config.schema import Targets


@dataclass(frozen=True)
class Plan:
    targets: Targets
    steps: tuple[Step, ...]  # topological order

    def select(self, only: str | None) -> Plan:
        """Keep the steps of MODEL or MODEL/FORMAT, and what they depend on."""
        if not only:
            return self
        model, _, fmt = only.partition("/")
        names = {m.name for m in self.targets.models}
        if model not in names:
            raise BadInputError(f"--only {only}: no model {model!r} (models: {', '.join(sorted(names))})")
        wanted = [s for s in self.steps if s.model == model and (not fmt or s.fmt == fmt)]
        if fmt and not wanted:
            raise BadInputError(f"--only {only}: model {model!r} has no format {fmt!r}")
        return Plan(self.targets, with_dependencies(self.steps, wanted))


def with_dependencies(steps: tuple[Step, ...], wanted: Iterable[Step]) -> tuple[Step, ...]:
    """`steps` (in order) restricted to `wanted` and everything they depend on."""
    keep: set[int] = set()
    stack = list(wanted)
    while stack:
        step = stack.pop()
        if id(step) not in keep:
            keep.add(id(step))
            stack.extend((*step.inputs.values(), *step.after))
    return tuple(s for s in steps if id(s) in keep)


def upstream_of_kind(step: Step, kind: str) -> Step | None:
    """The first step of `kind` among `step` and what it depends on (e.g. the source a quantization came from)."""
    stack = [step]
    while stack:
        current = stack.pop()
        if current.kind == kind:
            return current
        stack.extend(current.inputs.values())
    return None


def file_readers(steps: Iterable[Step]) -> dict[str, set[str]]:
    """label -> the labels of the steps among `steps` that read its output's files (a step that reads only an
    input's recorded data, Step.data_only, does not count): what `build --evict` waits for."""
    readers: dict[str, set[str]] = {}
    for step in steps:
        readers.setdefault(step.label, set())
        for role, dep in step.inputs.items():
            if role not in step.data_only:
                readers.setdefault(dep.label, set()).add(step.label)
    return readers


def evictable_inputs(step: Step, readers: dict[str, set[str]], finished: set[str]) -> list[Step]:
    """The inputs `build --evict` deletes once `step` (in `finished`) has run: those of an evictable kind whose
    file readers (file_readers) have all run. The build's Evictor and the disk estimate both ask this."""
    return [dep for dep in step.inputs.values() if kind_info(dep.kind).evict and readers[dep.label] <= finished]


def topological(steps: Iterable[Step]) -> tuple[Step, ...]:
    ordered: list[Step] = []
    seen: set[int] = set()

    def visit(step: Step) -> None:
        if id(step) in seen:
            return
        seen.add(id(step))
        for dep in (*step.inputs.values(), *step.after):
            visit(dep)
        ordered.append(step)

    for step in steps:
        visit(step)
    labels = [s.label for s in ordered]
    dupes = {lbl for lbl in labels if labels.count(lbl) > 1}
    if dupes:
        raise AssertionError(f"duplicate step labels in plan: {sorted(dupes)}")
    return tuple(ordered)
