"""The expected peak memory of each heavy step, before anything runs: what `quantforge plan` shows, and what
`build` checks so that a step that cannot fit is refused with both numbers instead of being killed half-way.

Everything comes from the source's config.json and its safetensors headers (no weight is read, torch is not
imported): a local source's folder, or a Hub source's snapshot in the Hugging Face cache; a Hub source not yet
fetched is "unknown until fetched". The figures are estimates of resident (anonymous) memory; pages of a file
the step maps or reads (the checkpoint, a GGUF) are page cache that the kernel can drop, and are not counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core.plan import upstream_of_kind
from ..core.registry import kind_info
from ..core.step import Step
from ..errors import OutOfMemory
from ..figures import format_size
from ..toolchains.device import choose_forward, gpu_memory, nvidia_driver_present
from ..toolchains.layerwise import PeakEstimate, checkpoint_tensors, estimate_peak_bytes
from ..toolchains.memory import HostMemory, host_memory
from .rates import token_shape
from .source import hub_commit


@dataclass(frozen=True)
class StepMemory:
    label: str
    kind: str
    host_bytes: int | None  # None: unknown (the source is not fetched yet)
    gpu_bytes: int | None  # None: no GPU, or the step does not use it
    how: str  # how it runs, in words

    def fits(self, host: HostMemory) -> bool:
        return self.host_bytes is None or self.host_bytes <= host.available

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "host_bytes": self.host_bytes, "gpu_bytes": self.gpu_bytes,
                "how": self.how}


@dataclass(frozen=True)
class MemoryPlan:
    host: HostMemory
    gpu: tuple[int, int] | None  # (free, total) bytes
    steps: list[StepMemory]

    def to_json(self) -> dict[str, Any]:
        return {"host_available_bytes": self.host.available, "host_total_bytes": self.host.total,
                "cgroup_limit_bytes": None if self.host.cgroup is None else self.host.cgroup.limit,
                "gpu_free_bytes": None if self.gpu is None else self.gpu[0],
                "gpu_total_bytes": None if self.gpu is None else self.gpu[1],
                "steps": [{**s.to_json(), "fits": s.fits(self.host)} for s in self.steps]}

    def lines(self) -> list[str]:
        head = f"memory: host {self.host.describe()}"
        if self.gpu is not None:
            head += f"; GPU {format_size(self.gpu[0])} free of {format_size(self.gpu[1])}"
        out = [head]
        for s in self.steps:
            size = "unknown" if s.host_bytes is None else format_size(s.host_bytes)
            gpu = f" + GPU {format_size(s.gpu_bytes)}" if s.gpu_bytes else ""
            warning = "" if s.fits(self.host) else "  DOES NOT FIT"
            out.append(f"  {s.label:<36} peak host {size:>9}{gpu}  {s.how}{warning}")
        return out


def memory_plan(steps: Iterable[Step]) -> MemoryPlan:
    """The expected peak of every heavy step among `steps`, against what this machine has now."""
    host = host_memory()
    gpu = gpu_memory() if nvidia_driver_present() else None
    return MemoryPlan(host, gpu, [estimate_step(s, host, gpu) for s in steps if is_heavy(s)])


def check_fits(steps: Iterable[Step]) -> MemoryPlan:
    """Raise OutOfMemory naming every step whose estimate exceeds the memory available (or the cgroup limit)."""
    plan = memory_plan(steps)
    too_big = [s for s in plan.steps if not s.fits(plan.host)]
    if too_big:
        lines = [f"{s.label} needs about {format_size(s.host_bytes or 0)} of host memory ({s.how}); "
                 f"{plan.host.describe()}" for s in too_big]
        raise OutOfMemory("not enough memory; refusing to start what would be killed half-way:\n  " +
                          "\n  ".join(lines),
                          hint="free memory or raise the limit, use fewer evaluation chunks or calibration "
                               "samples, a CUDA GPU, or --no-memory-check to try anyway")
    return plan


# ---------------------------------------------------------------------------------------------- estimates

def is_heavy(step: Step) -> bool:
    """Whether `step`'s kind says what memory it needs (the heavy kinds do; windows, gates, cards do not)."""
    return kind_info(step.kind).estimates.memory is not None


def estimate_step(step: Step, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    """A heavy step's peak, as its kind estimates it from the source's config and safetensors headers."""
    source_dir = _source_dir(step)
    if source_dir is None:
        return StepMemory(step.label, step.kind, None, None, "unknown until the source is fetched")
    estimate = kind_info(step.kind).estimates.memory
    assert estimate is not None, f"{step.kind} says nothing of its memory"
    try:
        return estimate(step, source_dir, host, gpu)
    except (OSError, ValueError, KeyError) as exc:  # no safetensors, an odd config: say so, do not fail the plan
        return StepMemory(step.label, step.kind, None, None, f"unknown ({exc})")


def torch_pass_memory(step: Step, source_dir: Path, host: HostMemory, gpu: tuple[int, int] | None) -> StepMemory:
    """A forward pass of the source in torch over a step's evaluation windows or calibration samples (the
    reference, an importance matrix): whole when it fits, one decoder layer at a time when it does not."""
    shape = token_shape(step)
    choice = choose_forward(lambda dtype: _estimate(source_dir, shape, dtype), host.available,
                            None if gpu is None else gpu[0])
    how = f"{choice.path} in {choice.dtype} on {choice.device}"
    if choice.path == "streamed":
        whole = _estimate(source_dir, shape, choice.dtype).whole_model
        how += f", one decoder layer at a time (whole model: {format_size(whole)})"
    return StepMemory(step.label, step.kind, choice.host_bytes, choice.device_bytes or None, how)


@lru_cache(maxsize=64)
def _estimate(source_dir: Path, shape: tuple[int, int], dtype: str) -> PeakEstimate:
    return estimate_peak_bytes(source_dir, shape, dtype)


@dataclass(frozen=True)
class SourceShapes:
    """What a heavy step's estimate reads of the source: sizes from config.json and the safetensors headers."""

    params: int  # every tensor's elements
    largest_numel: int  # the largest tensor's elements
    itemsize: int  # bytes per element as stored (the widest dtype)
    hidden: int
    intermediate: int
    layer_params: int  # elements in one decoder layer


@lru_cache(maxsize=16)
def source_shapes(source_dir: Path) -> SourceShapes:
    config = json.loads((source_dir / "config.json").read_text())
    config = config.get("text_config", config)
    tensors = checkpoint_tensors(source_dir)  # name -> (stored dtype's itemsize, number of elements)
    layers = max(int(config.get("num_hidden_layers", 1)), 1)
    in_layers = sum(n for name, (_, n) in tensors.items() if ".layers." in name)
    return SourceShapes(params=sum(n for _, n in tensors.values()),
                        largest_numel=max(n for _, n in tensors.values()),
                        itemsize=max(size for size, _ in tensors.values()), hidden=int(config["hidden_size"]),
                        intermediate=int(config.get("intermediate_size", 4 * config["hidden_size"])),
                        layer_params=in_layers // layers)


def _source_dir(step: Step) -> Path | None:
    """The source checkpoint's folder: a local source's, or a Hub source's snapshot when it is in the HF cache."""
    source = upstream_of_kind(step, "source")
    if source is None:
        return None
    params = source.params
    if "digest" in params:
        return Path(source.local["folder"])  # the key holds the path as written; this is where it is here
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(params["source"], "config.json", revision=hub_commit(source))
    if not isinstance(found, str):  # None or the "known not to exist" marker
        return None
    folder = Path(found).parent
    weights = folder / "model.safetensors.index.json"
    if weights.is_file():  # every shard must be there, or the headers cannot be read
        shards = set(json.loads(weights.read_text())["weight_map"].values())
        return folder if all((folder / shard).is_file() for shard in shards) else None
    return folder if (folder / "model.safetensors").is_file() else None


