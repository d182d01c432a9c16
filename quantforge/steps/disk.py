"""The disk a build needs, before anything runs: what `plan --github-matrix` puts on each leg, and what `build`
checks before it downloads anything, so that a runner too small fails in a second with both numbers instead of
hours in.

Sizes come from what planning already knows: the source's file sizes (a Hub source's from the same request that
resolves its revision, a local folder's from the folder), the intermediate's and each type's bits per weight.
The build is replayed step by step over the filesystems it writes to (the work dir, the Hugging Face cache a Hub
source is downloaded into, a `dir:` destination), adding each output when its step finishes and, with eviction,
removing it once its last reader has run: the peak on each filesystem is what it must have free.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.plan import evictable_inputs, file_readers, upstream_of_kind
from ..core.registry import kind_info
from ..core.step import Step
from ..errors import DiskFull
from ..figures import format_size
from ..store import mount_of
from .source import hub_commit, source_folder

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# the GGUF header holds the vocabulary and merges: about half the tokenizer files' size (JSON is verbose), again
# in every file
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.json")


@dataclass(frozen=True)
class SourceSize:
    """What a source model weighs: all its files, its weights, their parameter count (assuming 16-bit weights
    unless its config says otherwise), its tokenizer files."""

    total_bytes: int
    weight_bytes: int
    params: int
    vocab_bytes: int  # what its vocabulary adds to a GGUF header (and a checkpoint its tokenizer files)

    @classmethod
    def of(cls, source: Step) -> SourceSize:
        files: dict[str, int] = dict(source.local.get("files") or {})
        weights = sum(size for name, size in files.items() if _any(name, WEIGHT_PATTERNS))
        tokenizer = sum(size for name, size in files.items() if _any(name, TOKENIZER_PATTERNS))
        return cls(sum(files.values()), weights, int(weights / _itemsize(source)), tokenizer // 2)


def _any(name: str, patterns: Iterable[str]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, p) for p in patterns)


def _itemsize(source: Step) -> int:
    folder = source_folder(source)
    if folder is not None:
        import json

        try:
            config = json.loads((folder / "config.json").read_text())
            dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
        except (OSError, ValueError):
            dtype = ""
        if dtype in ("float32", "fp32"):
            return 4
    return 2  # bf16/fp16: what nearly every checkpoint on the Hub ships


def output_bytes(step: Step, size: SourceSize) -> int:
    """About how much `step`'s output adds to the disk, as its kind estimates it (0 for the small ones: windows,
    gates, logs)."""
    estimate = kind_info(step.kind).estimates.output_bytes
    return estimate(step, size) if estimate is not None else 0


def copied_bytes(step: Step, size: SourceSize) -> tuple[Path, int] | None:
    """The folder outside the work dir `step` copies into (a `dir:` publication), and about how much."""
    estimate = kind_info(step.kind).estimates.copied_bytes
    return estimate(step, size) if estimate is not None else None


def scratch_bytes(step: Step, size: SourceSize) -> int:
    """About how much `step` writes and deletes again before it ends (an upload's split shards)."""
    estimate = kind_info(step.kind).estimates.scratch_bytes
    return estimate(step, size) if estimate is not None else 0


@dataclass
class DiskUse:
    """The peak one filesystem sees during a build, and what makes it up."""

    mount: str
    places: list[str] = field(default_factory=list)  # "work dir /x", "Hugging Face cache /y", ...
    peak_bytes: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # label -> bytes, held at the peak

    def free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.mount).free
        except OSError:
            return 0

    def describe(self) -> str:
        parts = sorted(self.at_peak.items(), key=lambda kv: -kv[1])
        held = " + ".join(f"{label} {format_size(size)}" for label, size in parts[:4] if size)
        more = f" + {len(parts) - 4} more" if len(parts) > 4 else ""
        return f"{format_size(self.peak_bytes)} ({held}{more})" if held else format_size(self.peak_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"mount": self.mount, "places": self.places, "peak_bytes": self.peak_bytes,
                "at_peak": dict(self.at_peak)}


def disk_use(steps: Sequence[Step], todo: Iterable[str], *, work_root: Path, hf_cache: Path | None = None,
             evict: bool = False, one_disk: bool = False) -> list[DiskUse]:
    """Replay the steps in `todo` (plan order) and return the peak of each filesystem written to. `one_disk`:
    count everything on one filesystem (a CI runner's), rather than this machine's mounts; no `hf_cache`: a Hub
    source is downloaded whole."""
    run = set(todo)
    readers = file_readers(steps)  # as the build's Evictor counts them
    uses: dict[str, DiskUse] = {}
    held: dict[str, tuple[str, int]] = {}  # label -> (mount, bytes)
    live: dict[str, dict[str, int]] = {}  # mount -> label -> bytes
    finished: set[str] = set()

    def place(path: Path, what: str) -> str:
        mount = "one disk" if one_disk else mount_of(path)[1]
        use = uses.setdefault(mount, DiskUse(mount))
        if f"{what} {path}" not in use.places:
            use.places.append(f"{what} {path}")
        return mount

    def add(label: str, mount: str, size: int) -> None:
        if size <= 0:
            return
        held[label] = (mount, size)
        live.setdefault(mount, {})[label] = size
        total = sum(live[mount].values())
        if total > uses[mount].peak_bytes:
            uses[mount].peak_bytes, uses[mount].at_peak = total, dict(live[mount])

    def drop(label: str) -> None:
        mount, _ = held.pop(label)
        live[mount].pop(label, None)

    sizes: dict[str, SourceSize] = {}
    for step in steps:
        source = upstream_of_kind(step, "source")
        size = sizes.setdefault(source.label, SourceSize.of(source)) if source is not None else None
        if step.label in run and size is not None:
            if step.kind == "source" and source_folder(step) is None:  # a Hub source, into the HF cache
                add(f"{step.model} source", place(hf_cache or work_root, "Hugging Face cache"),
                    size.total_bytes if hf_cache is None else _missing_from_cache(step, hf_cache, size.total_bytes))
            elif copied := copied_bytes(step, size):  # into a folder outside the work dir
                folder, copy = copied
                add(f"{step.label} (copy)", place(folder, "destination"), copy)
            else:
                mount = place(work_root, "work dir")
                if scratch := scratch_bytes(step, size):  # written and deleted again while the step runs
                    add(f"{step.label} (scratch)", mount, scratch)
                    drop(f"{step.label} (scratch)")
                add(step.label, mount, output_bytes(step, size))
        finished.add(step.label)
        if evict:
            for dep in evictable_inputs(step, readers, finished):
                if dep.label in held:
                    drop(dep.label)
    return [u for u in uses.values() if u.peak_bytes > 0]


def _missing_from_cache(source: Step, hf_cache: Path, total: int) -> int:
    """The bytes of a Hub source's files its snapshot in the HF cache does not hold yet."""
    snapshot = hf_cache / f"models--{source.params['source'].replace('/', '--')}" / "snapshots" / \
        str(hub_commit(source))
    files: dict[str, int] = dict(source.local.get("files") or {})
    if not files:
        return total
    return sum(size for name, size in files.items() if not (snapshot / name).is_file())


def check_disk(steps: Sequence[Step], todo: Iterable[str], *, work_root: Path, evict: bool) -> list[DiskUse]:
    """The preflight: raise DiskFull naming each filesystem whose expected peak exceeds its free space."""
    from huggingface_hub.constants import HF_HUB_CACHE

    uses = disk_use(steps, todo, work_root=work_root, hf_cache=Path(HF_HUB_CACHE), evict=evict)
    short = [(u, u.free_bytes()) for u in uses]
    short = [(u, free) for u, free in short if u.peak_bytes > free]
    if short:
        lines = [f"{', '.join(u.places)}: need about {u.describe()}, {format_size(free)} free on {u.mount}"
                 for u, free in short]
        error = DiskFull("not enough disk for this build; refusing to start what would fail half-way:\n  "
                         + "\n  ".join(lines))
        error.hint = ("free space, point --work-dir or HF_HOME at a larger disk, build fewer types per run (--only), "
                      "or --evict to delete intermediates and artifacts once used" if not evict else
                      "free space, point --work-dir or HF_HOME at a larger disk, or build fewer types per run")
        raise error
    return uses
