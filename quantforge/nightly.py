"""Nightly builds on GitHub Actions: the matrix of legs a plan makes, and the workflow `quantforge ci init` writes.

    plan job:   quantforge plan targets.yaml --github-matrix      one leg per model with anything stale
    build job:  quantforge build targets.yaml --only MODEL         one runner per leg (runs-on from `runner:`)
    summary:    quantforge report merge reports/*.json             one table in the run's summary

A plan job has no work dir: whether a model is up to date comes from what its repos record (quantforge.json
carries the key of the publish step that made it; core/staleness.py), so an unchanged night costs one request per
model (its revision) and one per repo (its record), and downloads nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .console import reason_text
from .core.plan import Plan
from .core.step import Reason, Step
from .errors import BadInputError
from .figures import format_size
from .steps.disk import SourceSize, disk_use
from .steps.memory import memory_plan

MAX_LEGS = 256  # GitHub's limit on the jobs one matrix makes
MAX_REASONS = 8
TEMPLATE = "nightly.yml"
# fp32 weights of the torch reference pass plus its runtime: the largest step when a Hub source's shapes are not
# known yet (they are read from its safetensors headers once it is fetched)
RUNTIME_BYTES = 1 << 30


@dataclass(frozen=True)
class Leg:
    model: str
    runs_on: str | list[str]
    reasons: list[str]
    stale_steps: int
    disk_bytes: int
    memory_bytes: int | None
    memory_how: str

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "runs-on": self.runs_on, "reasons": self.reasons,
                "stale_steps": self.stale_steps, "disk_bytes": self.disk_bytes, "disk": format_size(self.disk_bytes),
                "memory_bytes": self.memory_bytes,
                "memory": "unknown" if self.memory_bytes is None else format_size(self.memory_bytes),
                "memory_how": self.memory_how}


def github_matrix(plan: Plan, todo: dict[str, list[Reason]], *, every_model: bool = False) -> dict[str, Any]:
    """`{"include": [leg, ...]}` for `strategy.matrix: ${{ fromJSON(...) }}`: a leg per model with a stale step
    (every model with `every_model`). Each leg's disk is its peak with eviction on one disk, as on a runner."""
    legs = []
    for model in plan.targets.models:
        steps = tuple(s for s in plan.steps if s.model == model.name)
        stale = [s for s in steps if s.label in todo]
        if not steps or (not stale and not every_model):
            continue
        run = [s.label for s in (stale or steps)]
        uses = disk_use(steps, run, work_root=Path(".quantforge"), evict=True, one_disk=True)
        memory, how = _leg_memory([s for s in steps if s.label in run])
        legs.append(Leg(model.name, model.runner, leg_reasons(stale, todo) or ["forced (--all)"], len(stale),
                        max((u.peak_bytes for u in uses), default=0), memory, how))
    if len(legs) > MAX_LEGS:
        raise BadInputError(f"{len(legs)} models need a build, and a GitHub Actions matrix holds at most {MAX_LEGS} "
                            "jobs: split the targets file, or plan part of it with --only")
    return {"include": [leg.to_json() for leg in legs]}


def leg_reasons(stale: list[Step], todo: dict[str, list[Reason]]) -> list[str]:
    """Why a model's leg runs, in short: what its repos' records say changed (a fresh work dir knows nothing
    else); otherwise the reasons of the first stale steps (those whose inputs are all up to date)."""
    def remote(step: Step) -> bool:
        return step.kind == "publish" and all(r.what in ("unpublished", "since-published") for r in todo[step.label])

    labels = {s.label for s in stale}
    chosen = [s for s in stale if remote(s)] or \
        [s for s in stale if not any(d.label in labels for d in s.inputs.values())]
    out = list(dict.fromkeys(_short(s, r) for s in chosen for r in todo[s.label]))  # one per new source commit
    if len(out) > MAX_REASONS:
        out = [*out[:MAX_REASONS - 1], f"and {len(out) - MAX_REASONS + 1} more"]
    return out


def _short(step: Step, reason: Reason) -> str:
    """A reason without the model's name, which the leg already says: `source: changed since published`."""
    def unprefixed(label: str) -> str:
        return label.removeprefix(step.model + "/").removeprefix(step.model + ":")

    text = reason_text(Reason(reason.what, reason.key and unprefixed(reason.key), reason.old, reason.new))
    return text if reason.what in ("unpublished", "since-published") else f"{unprefixed(step.label)}: {text}"


def _leg_memory(steps: list[Step]) -> tuple[int | None, str]:
    """The largest step's expected host memory (steps/memory.py, from the source's config and safetensors headers
    when they are on this machine); else the torch reference's whole model in fp32, from the weights' size."""
    plan = memory_plan(steps)
    known = [s for s in plan.steps if s.host_bytes is not None]
    if known:
        top = max(known, key=lambda s: s.host_bytes or 0)
        return top.host_bytes, f"{top.label}: {top.how}"
    source = next((s for s in steps if s.kind == "source"), None)
    if source is None or not source.local.get("files"):
        return None, "unknown"
    size = SourceSize.of(source)
    return RUNTIME_BYTES + 4 * size.params, "torch reference, whole model in fp32 (streamed when less is free)"


def workflow_text(targets: str, *, install: str | None = None, constraints: str | None = None) -> str:
    """The nightly workflow for a repository whose targets file is `targets` (relative to its root); `install`:
    what pip installs quantforge from, `constraints`: a constraints file pinning the tool versions."""
    text = resources.files("quantforge").joinpath(f"templates/{TEMPLATE}").read_text(encoding="utf-8")
    settings = {"TARGETS": targets, "QUANTFORGE_INSTALL": install, "QUANTFORGE_CONSTRAINTS": constraints}
    for name, value in settings.items():
        if value is not None:
            start = text.index(f"\n  {name}: ") + 1
            end = text.index("\n", start)
            text = text[:start] + f"  {name}: {json.dumps(value) if not value or ' ' in value else value}" + text[end:]
    return text


def write_workflow(targets: Path, out_dir: Path, *, force: bool = False) -> Path:
    """`quantforge ci init`: write .github/workflows/nightly.yml under `out_dir` for `targets`."""
    root = out_dir.resolve()
    try:
        relative = targets.resolve().relative_to(root).as_posix()
    except ValueError:
        raise BadInputError(f"{targets} is not inside {out_dir}: the workflow names the targets file relative to "
                            "the repository root (--out)") from None
    path = root / ".github" / "workflows" / TEMPLATE
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workflow_text(relative, install=f"quantforge=={__version__}"), encoding="utf-8")
    return path
