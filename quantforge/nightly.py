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
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .console import reason_text
from .core.plan import Plan
from .core.step import Reason, Step
from .distribution import InstallSpec, install_spec
from .errors import BadInputError
from .figures import format_duration, format_size
from .fit import LegFit, fit_leg, legs_of, refuse_unfit
from .pipeline import KEY_TOOLS
from .toolchains.pins import RUNTIME, canonical, installed_pins, read_pins

MAX_LEGS = 256  # GitHub's limit on the jobs one matrix makes
MAX_REASONS = 8
TEMPLATE = "nightly.yml"
DEFAULT_CONSTRAINTS = ".github/quantforge-constraints.txt"
CONSTRAINTS_HEADER = """\
# Written by `quantforge ci init`: the tool versions every job of the nightly installs with (pip -c). The plan job
# installs none of these tools and takes their versions from here for the cache keys, so that its keys are the
# legs'. Change a pin to move every job to another version; the workflow's caches are keyed by this file.
"""
_PLAIN_RE = re.compile(r"[A-Za-z0-9._/-]+")


@dataclass(frozen=True)
class MatrixLeg:
    """A leg as the workflow reads it (`matrix.<key>`)."""

    model: str
    fit: LegFit
    reasons: list[str]

    def to_json(self) -> dict[str, Any]:
        fit, size = self.fit, self.fit.size
        seconds = None if fit.time is None else round(fit.time.seconds)
        return {"model": self.model, "runs-on": fit.runner.runs_on, "reasons": self.reasons,
                "stale_steps": len(fit.leg.stale), "disk_bytes": fit.disk, "disk": format_size(fit.disk),
                "memory_bytes": fit.memory, "memory": "unknown" if fit.memory is None else format_size(fit.memory),
                "memory_how": fit.memory_how, "time_seconds": seconds,
                "time": "unknown" if seconds is None else format_duration(seconds),
                "timeout": size.timeout, "gpu": size.gpu, "hosted": size.hosted}


def github_matrix(plan: Plan, todo: dict[str, list[Reason]], *, every_model: bool = False, check: bool = True
                  ) -> tuple[dict[str, Any], list[str]]:
    """`{"include": [leg, ...]}` for `strategy.matrix: ${{ fromJSON(...) }}`: a leg per model with a stale step
    (every model with `every_model`), each with its expected peak disk (with eviction, on one disk, as on a
    runner), memory and time on its runner, its timeout in minutes and whether it has a GPU; and notes on what
    could not be checked. Raises RunnerTooSmall when a leg does not fit its runner (fit.py), unless not `check`."""
    legs = legs_of(plan, todo, every_model=every_model)
    if len(legs) > MAX_LEGS:
        raise BadInputError(f"{len(legs)} models need a build, and a GitHub Actions matrix holds at most {MAX_LEGS} "
                            "jobs: split the targets file, or plan part of it with --only")
    fits = [fit_leg(leg) for leg in legs]
    if check:
        refuse_unfit(fits)
    matrix = [MatrixLeg(f.leg.model.name, f, leg_reasons(list(f.leg.stale), todo) or ["forced (--all)"])
              for f in fits]
    notes = [f"leg {f.leg.model.name} on {f.runner.runs_on}: {note}" for f in fits for note in f.notes]
    return {"include": [leg.to_json() for leg in matrix]}, notes


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


def workflow_text(targets: str, *, install: str | None = None, constraints: str | None = None) -> str:
    """The nightly workflow for a repository whose targets file is `targets` (relative to its root); `install`:
    what pip installs quantforge from, `constraints`: the constraints file pinning the tool versions."""
    text = resources.files("quantforge").joinpath(f"templates/{TEMPLATE}").read_text(encoding="utf-8")
    settings = {"TARGETS": targets, "QUANTFORGE_INSTALL": install, "QUANTFORGE_CONSTRAINTS": constraints}
    for name, value in settings.items():
        if value is not None:
            start = text.index(f"\n  {name}: ") + 1
            end = text.index("\n", start)
            shown = value if _PLAIN_RE.fullmatch(value) else json.dumps(value)  # a JSON string is YAML too
            text = text[:start] + f"  {name}: {shown}" + text[end:]
    return text


@dataclass(frozen=True)
class CiFiles:
    """What `ci init` wrote: the workflow, the constraints file (kept when it existed), the install line."""

    workflow: Path
    constraints: Path
    constraints_written: bool
    pins: dict[str, str]
    install: InstallSpec


def write_workflow(targets: Path, out_dir: Path, *, force: bool = False, install: str | None = None,
                   constraints: Path | None = None) -> CiFiles:
    """`quantforge ci init`: write .github/workflows/nightly.yml under `out_dir` for `targets`, installing
    `install` (default: distribution.install_spec) with the tool versions of `constraints` (kept when it exists;
    default: .github/quantforge-constraints.txt, written with the versions installed here unless it exists, and
    rewritten with `force`)."""
    root = out_dir.resolve()
    relative = _inside(targets, root, "the targets file")
    path = root / ".github" / "workflows" / TEMPLATE
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to overwrite it")
    spec = install_spec(root, install)
    # a file named with --constraints is the user's own: kept; the default one is ours, rewritten with --force
    keep = constraints is not None or not force
    constraints = constraints.resolve() if constraints is not None else root / DEFAULT_CONSTRAINTS
    constraints_name = _inside(constraints, root, "the constraints file")
    if constraints.exists() and keep:
        pins = read_pins(constraints)
        missing = [tool for tool in KEY_TOOLS if canonical(tool) not in pins]
        if missing:
            raise BadInputError(f"{constraints} pins no version of {', '.join(missing)} (e.g. "
                                f"{missing[0]}=={installed_pins(KEY_TOOLS).get(missing[0]) or 'VERSION'}): every job "
                                "installs with it and the plan job takes the tools' versions from it: add the "
                                "pins")
        written = False
    else:
        pins = _installed_key_pins()
        constraints.parent.mkdir(parents=True, exist_ok=True)
        constraints.write_text(CONSTRAINTS_HEADER + "".join(f"{name}=={v}\n" for name, v in pins.items()),
                               encoding="utf-8")
        written = True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workflow_text(relative, install=spec.spec, constraints=constraints_name), encoding="utf-8")
    return CiFiles(path, constraints, written, pins, spec)


def _installed_key_pins() -> dict[str, str]:
    installed = installed_pins(KEY_TOOLS + RUNTIME)
    missing = [tool for tool in KEY_TOOLS if installed[tool] is None]
    if missing:
        raise BadInputError(f"{', '.join(missing)} not installed here: `ci init` pins the tool versions installed "
                            "where it runs; install quantforge fully, or pass --constraints FILE pinning them")
    return {name: version for name, version in installed.items() if version is not None}


def _inside(path: Path, root: Path, what: str) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise BadInputError(f"{path} is not inside {root}: the workflow names {what} relative to the repository "
                            "root (--out)") from None
