"""`runner:` in targets.yaml: the GitHub Actions runner of a model's nightly leg, and how large it is.

    runner: ubuntu-latest                          a label (sizes from the table of GitHub-hosted runners)
    runner: [self-hosted, gpu]                     labels a runner must have all of (sizes unknown)
    runner: {labels: [self-hosted, a100], cores: 32, memory: 256GB, disk: 1TB, gpu_memory: 80GB, timeout: 3d}

Every form becomes a `RunnerSpec`. A hosted label's sizes come from GitHub's documentation (not measured here);
declared sizes override them (a private repository's ubuntu-latest has 2 cores and 8 GB). `plan` and `validate`
check each leg's estimated disk, memory and time against what is known and say what is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..figures import parse_size
from .text import visible

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(m|min|h|d)?", re.IGNORECASE)
_MINUTES = {"m": 1, "min": 1, "h": 60, "d": 24 * 60}

# A job on a GitHub-hosted runner stops at 6 hours; on a self-hosted runner at 5 days (GitHub's documented limits)
HOSTED_JOB_MINUTES = 6 * 60
SELF_HOSTED_JOB_MINUTES = 5 * 24 * 60
# What a job gets without `timeout-minutes`, on any runner
DEFAULT_TIMEOUT_MINUTES = 6 * 60
# A hosted leg's own timeout fires 10 minutes before GitHub's, so that its report and logs are still uploaded
HOSTED_TIMEOUT_MINUTES = HOSTED_JOB_MINUTES - 10


@dataclass(frozen=True)
class RunnerSize:
    """What a runner offers a leg; None: not known (neither in the table nor declared)."""

    cores: int | None
    memory: int | None  # bytes of RAM
    disk: int | None  # bytes free for the job, after the workflow's clean-up step on a hosted runner
    gpu_memory: int | None  # bytes; None: no GPU, or one of unknown size
    timeout: int  # minutes the leg may run (its timeout-minutes)
    gpu: bool
    hosted: bool
    where: str  # where the figures come from, in words


# GitHub's documentation for standard runners of public repositories (DESIGN.md section 5): 4 cores, 16 GB RAM,
# about 14 GB free disk, and about 30 GB more once the preinstalled toolchains are deleted (the workflow's
# clean-up step does). Documented figures, not measured here. Private repositories get 2 cores and 8 GB: declare
# `runner: {labels: [ubuntu-latest], cores: 2, memory: 8GB}` there.
_HOSTED_SIZE = {"cores": 4, "memory": 16 * 10**9, "disk": (14 + 30) * 10**9}
HOSTED_LABELS = ("ubuntu-latest", "ubuntu-24.04", "ubuntu-22.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm")


def _label_ok(label: str) -> bool:
    return bool(label.strip()) and label == label.strip() and not _CONTROL_RE.search(label)


def parse_minutes(value: Any) -> int:
    """'90m', '6h', '5d', '1.5h' or a number of minutes -> minutes."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90m, 6h or 5d")
    if isinstance(value, int | float):
        minutes = float(value)
    else:
        match = _DURATION_RE.fullmatch(str(value).strip())
        if not match:
            raise ValueError("expected a duration such as 90m, 6h or 5d")
        minutes = float(match[1]) * _MINUTES[(match[2] or "m").lower()]
    if not 1 <= minutes <= SELF_HOSTED_JOB_MINUTES:
        raise ValueError("must be from 1 minute to 5d (GitHub stops a self-hosted runner's job at 5 days)")
    return round(minutes)


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a size such as 64GB, 500GB or 2TB")
    try:
        size = parse_size(value)
    except (ValueError, OverflowError):
        raise ValueError("expected a size such as 64GB, 500GB or 2TB") from None
    if size < 10**9:
        raise ValueError("must be at least 1GB")
    return size


_SIZE = {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]}
# What targets.yaml may write (the validators below turn each form into a RunnerSpec): for `quantforge schema`
RUNNER_JSON_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "object", "additionalProperties": False, "required": ["labels"], "properties": {
        "labels": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "cores": {"type": "integer", "minimum": 1}, "memory": _SIZE, "disk": _SIZE, "gpu_memory": _SIZE,
        "timeout": {"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]}}}]}


class RunnerSpec(BaseModel):
    """A leg's runner: the labels `runs-on` gets, and the sizes declared for it (bytes; timeout in minutes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: tuple[str, ...] = Field(min_length=1)
    cores: int | None = Field(None, ge=1, le=100000)
    memory: int | None = None
    disk: int | None = None
    gpu_memory: int | None = None
    timeout: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, value: Any) -> Any:
        """A label or a list of labels is a runner with no declared sizes."""
        if isinstance(value, str) or isinstance(value, list):
            return {"labels": value}
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        labels = [value] if isinstance(value, str) else value
        for label in labels if isinstance(labels, list | tuple) else ():
            if isinstance(label, str):
                visible(label)  # named, like any other invisible character in targets.yaml
        if not isinstance(labels, list | tuple) or not labels or not all(
                isinstance(label, str) and _label_ok(label) for label in labels):
            raise ValueError("expected a runner label such as ubuntu-latest, or a list such as [self-hosted, gpu]")
        return tuple(labels)

    @field_validator("memory", "disk", "gpu_memory", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> int | None:
        return None if value is None else _size(value)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> int | None:
        return None if value is None else parse_minutes(value)

    @model_validator(mode="after")
    def _hosted_limit(self) -> RunnerSpec:
        if self.hosted and self.timeout is not None and self.timeout > HOSTED_JOB_MINUTES:
            raise ValueError(f"timeout: GitHub stops a job on {self.labels[0]} at 6h; a longer leg needs a larger "
                             "or self-hosted runner")
        return self

    @property
    def runs_on(self) -> str | list[str]:
        """What `runs-on` gets: one label as a string, several as a list."""
        return self.labels[0] if len(self.labels) == 1 else list(self.labels)

    @property
    def hosted(self) -> bool:
        """A standard GitHub-hosted runner: one label of the table (a hosted runner has exactly one)."""
        return len(self.labels) == 1 and self.labels[0] in HOSTED_LABELS

    @property
    def gpu(self) -> bool:
        return self.gpu_memory is not None or any("gpu" in label.lower() for label in self.labels)

    def size(self) -> RunnerSize:
        """The sizes this leg can count on: declared ones first, then the hosted table's."""
        table: dict[str, int] = dict(_HOSTED_SIZE) if self.hosted else {}
        declared = {k: getattr(self, k) for k in ("cores", "memory", "disk") if getattr(self, k) is not None}
        if self.hosted:
            where = (f"GitHub's documented {self.labels[0]}" if not declared else
                     f"{self.labels[0]}, with declared {', '.join(declared)}")
        elif declared or self.gpu_memory is not None or self.timeout is not None:
            where = "declared in runner:"
        else:
            where = "unknown: no sizes declared"
        sizes = {**table, **declared}
        timeout = self.timeout or (HOSTED_TIMEOUT_MINUTES if self.hosted else DEFAULT_TIMEOUT_MINUTES)
        return RunnerSize(cores=sizes.get("cores"), memory=sizes.get("memory"), disk=sizes.get("disk"),
                          gpu_memory=self.gpu_memory, timeout=timeout, gpu=self.gpu, hosted=self.hosted,
                          where=where)


DEFAULT_RUNNER = RunnerSpec(labels=("ubuntu-latest",))
