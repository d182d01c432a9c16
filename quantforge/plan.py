"""From a validated targets file to a DAG of steps with cache keys, and why each one is stale.

A step is an immutable description: kind, parameters, input steps and tool versions. Its key is the sha256 of
all of them (inputs by their own keys), so a change anywhere upstream changes exactly the keys downstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .config import Targets
from .errors import BadInputError
from .runners import VERSIONS, check_cached
from .store import WorkDir, canonical_json


@dataclass(frozen=True, eq=False)
class Step:
    kind: str
    label: str  # unique in a plan, e.g. "smollm2/gguf/Q4_K_M:quantize"
    params: Mapping[str, Any]
    inputs: Mapping[str, Step] = field(default_factory=dict)  # role -> step
    tools: Mapping[str, str] = field(default_factory=dict)  # tool -> version (impl versions included)
    model: str = ""
    fmt: str = ""

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "inputs": {role: step.key for role, step in self.inputs.items()},
            # the implementation's version counts as a tool: changing what a kind produces makes it stale
            "tools": {**self.tools, "quantforge." + self.kind: VERSIONS.get(self.kind, "0")},
        }

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.fingerprint()).encode()).hexdigest()


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
        keep: set[int] = set()
        stack = list(wanted)
        while stack:
            step = stack.pop()
            if id(step) not in keep:
                keep.add(id(step))
                stack.extend(step.inputs.values())
        return Plan(self.targets, tuple(s for s in self.steps if id(s) in keep))


def topological(steps: Iterable[Step]) -> tuple[Step, ...]:
    ordered: list[Step] = []
    seen: set[int] = set()

    def visit(step: Step) -> None:
        if id(step) in seen:
            return
        seen.add(id(step))
        for dep in step.inputs.values():
            visit(dep)
        ordered.append(step)

    for step in steps:
        visit(step)
    labels = [s.label for s in ordered]
    dupes = {lbl for lbl in labels if labels.count(lbl) > 1}
    if dupes:
        raise AssertionError(f"duplicate step labels in plan: {sorted(dupes)}")
    return tuple(ordered)


def stale_reasons(step: Step, work: WorkDir) -> list[str]:
    """Why `step` must run; empty when its output is in the cache. Cheapest checks first."""
    manifest = work.lookup(step.kind, step.key)
    if manifest is not None:
        problem = check_cached(step, manifest)
        return [problem] if problem else []
    last = work.last_state(step.label)
    if last is None:
        return ["never built"]
    if last.get("key") == step.key:
        return ["output missing from the work dir"]
    now = step.fingerprint()
    reasons = [f"params.{k}: {last['params'].get(k)!r} -> {now['params'].get(k)!r}"
               for k in sorted(set(now["params"]) | set(last.get("params", {})))
               if last["params"].get(k) != now["params"].get(k)]
    reasons += [f"tools.{k}: {last['tools'].get(k)} -> {now['tools'].get(k)}"
                for k in sorted(set(now["tools"]) | set(last.get("tools", {})))
                if last["tools"].get(k) != now["tools"].get(k)]
    reasons += [f"input {role} changed" for role in sorted(now["inputs"])
                if last.get("inputs", {}).get(role) != now["inputs"][role]]
    return reasons or ["inputs changed"]


def build_plan(targets: Targets, context: PlanContext) -> Plan:
    """Every step for every model and format, in dependency order."""
    from .calibrate import calibration_step
    from .evaluate import plan_evaluation
    from .formats import FORMATS
    from .publish import publish_step
    from .sources import source_step

    steps: list[Step] = []
    for model in targets.models:
        src = source_step(model, targets, context)
        evaluation = plan_evaluation(model, targets, src, context)
        steps += [src, evaluation.tokens, evaluation.reference]
        for fmt_name in model.formats.enabled():
            fmt = FORMATS[fmt_name]
            # the calibration windows a format asks for (shared when two formats ask for the same)
            def calibration(model=model, src=src, **override) -> Step:
                return calibration_step(model, targets, src, context, **override)

            artifacts = fmt.plan(model, getattr(model.formats, fmt_name), src, evaluation, context, calibration)
            steps.extend(artifacts.steps)
            steps.append(publish_step(model, fmt_name, artifacts.publishable, src, evaluation.tokens, targets))
    return Plan(targets, topological(steps))


@dataclass
class PlanContext:
    """What planning needs from the outside world: source resolution and tool versions, resolved once."""

    work: WorkDir
    offline: bool = False
    llama_cpp_dir: str | None = None
    enforce_gates: bool = True  # --no-gate: measure and record, but publish regardless (recorded in the keys)
    _cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
