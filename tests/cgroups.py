"""A memory-limited cgroup for tests and benchmarks: a child of this process's own group (so any limit above it
still holds), on cgroup v1 or v2, whichever the machine has (these machines: v1; GitHub's runners: v2). Making
one needs root. A process joins by writing its pid into `procs` (tests do it from the child's first line)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from quantforge.toolchains.memory import CGROUP_ROOT, cgroup_ancestors, own_cgroup_paths


class CgroupUnavailable(Exception):
    """No memory cgroup can be made here (not root, no memory controller); the message says why."""


@dataclass(frozen=True)
class Cgroup:
    path: Path
    version: int

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def peak(self) -> int | None:
        """The group's peak usage in bytes, page cache included (v2 needs kernel 5.19+)."""
        peak = self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(peak.read_text()) if peak.is_file() else None

    def peak_mb(self) -> int | None:
        peak = self.peak()
        return None if peak is None else peak >> 20

    def oom_kills(self) -> int | None:
        """Out-of-memory kills in the group (v1 needs kernel 4.13+)."""
        events = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        fields = dict(line.split() for line in events.read_text().splitlines())
        return int(fields["oom_kill"]) if "oom_kill" in fields else None

    def remove(self) -> None:
        for _ in range(50):  # the group empties a moment after its last process exits
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def memory_cgroup(name: str, limit: int) -> Cgroup:
    """A new group `name` limited to `limit` bytes without swap, so the limit binds rather than pushing pages out."""
    v1, v2 = own_cgroup_paths(Path("/proc/self/cgroup").read_text())
    reasons = []
    if v1 is not None and (CGROUP_ROOT / "memory").is_dir():
        group = cgroup_ancestors(CGROUP_ROOT / "memory", v1)[0] / name
        try:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            (group / "memory.swappiness").write_text("0")
            return Cgroup(group, 1)
        except OSError as exc:
            reasons.append(f"cgroup v1 at {group.parent}: {exc}")
            if group.is_dir():
                group.rmdir()
    if v2 is not None and (CGROUP_ROOT / "cgroup.controllers").is_file():
        parent = cgroup_ancestors(CGROUP_ROOT, v2)[0]
        group = parent / name
        try:
            if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                (parent / "cgroup.subtree_control").write_text("+memory")
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            if (group / "memory.swap.max").is_file():
                (group / "memory.swap.max").write_text("0")
            return Cgroup(group, 2)
        except OSError as exc:
            reasons.append(f"cgroup v2 at {parent}: {exc}")
            if group.is_dir():
                group.rmdir()
    raise CgroupUnavailable("; ".join(reasons) or "no memory cgroup for this process")


def memory_cgroup_or_skip(name: str, limit: int) -> Cgroup:
    """memory_cgroup, or a pytest skip that says why none can be made here."""
    import pytest
    from tiers import require_slow

    require_slow("makes a memory cgroup")
    try:
        return memory_cgroup(name, limit)
    except CgroupUnavailable as exc:
        pytest.skip(f"cannot make a memory-limited cgroup (needs root and a writable cgroup v1 memory controller "
                    f"or v2 hierarchy): {exc}")
