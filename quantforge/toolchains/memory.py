"""Host memory: how much a new process may still use (the machine's available memory, or less under a cgroup
limit), and how much a child process tree used while it ran.

A build is often run under a cgroup limit tighter than the machine (a container, a CI runner, a systemd slice):
there, psutil's "available" is the machine's and a process over the limit is killed (SIGKILL, exit 137) no
matter what the machine has free. So the limit, and what the group already uses, count too.
"""

from __future__ import annotations

import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-aligned 2**63 - 1


@dataclass(frozen=True)
class CgroupLimit:
    limit: int  # bytes
    used: int  # the group's working set: usage less the inactive page cache it can drop
    path: Path  # the group holding the tightest limit

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class HostMemory:
    total: int  # the machine's RAM
    available: int  # what a new process may allocate: the machine's available memory or the cgroup headroom
    cgroup: CgroupLimit | None  # the tightest cgroup limit, when one applies

    def describe(self) -> str:
        from ..figures import format_size

        text = f"{format_size(self.available)} available"
        if self.cgroup is not None:
            text += f" (cgroup limit {format_size(self.cgroup.limit)} at {self.cgroup.path})"
        return text


def host_memory() -> HostMemory:
    import psutil

    vm = psutil.virtual_memory()
    limit = cgroup_limit()
    available = vm.available if limit is None else min(vm.available, limit.headroom)
    return HostMemory(vm.total, available, limit)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.lstrip("-").isdigit() else int(text)


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def own_cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(cgroup v1 memory path, cgroup v2 path) of this process, from /proc/self/cgroup's text."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    return v1, v2


def cgroup_ancestors(mount: Path, own: str) -> list[Path]:
    """The group's folder and its parents up to the mount. In a cgroup namespace /proc shows "/" for the
    container's own group, which is then the mount itself."""
    leaf = mount / own.lstrip("/")
    if not leaf.is_dir():
        leaf = mount
    return [leaf, *(p for p in leaf.parents if p.is_relative_to(mount))]


def cgroup_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> CgroupLimit | None:
    """The tightest memory limit over this process's cgroup and its ancestors (v1 or v2), or None."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    v1, v2 = own_cgroup_paths(proc_cgroup)
    candidates: list[CgroupLimit] = []
    if v1 is not None and (root / "memory").is_dir():
        for group in cgroup_ancestors(root / "memory", v1):
            limit = _read_int(group / "memory.limit_in_bytes")
            usage = _read_int(group / "memory.usage_in_bytes")
            if limit is not None and limit < _UNLIMITED and usage is not None:
                used = usage - _stat(group / "memory.stat", "total_inactive_file")
                candidates.append(CgroupLimit(limit, max(0, used), group))
    elif v2 is not None and (root / "cgroup.controllers").is_file():
        for group in cgroup_ancestors(root, v2):
            limit = _read_int(group / "memory.max")
            usage = _read_int(group / "memory.current")
            if limit is not None and usage is not None:
                used = usage - _stat(group / "memory.stat", "inactive_file")
                candidates.append(CgroupLimit(limit, max(0, used), group))
    return min(candidates, key=lambda c: c.headroom, default=None)


def tree_peak_rss(pid: int) -> int:
    """The peak resident bytes of a process and of each of its descendants so far, added up (0 once it is gone).
    On Linux each process's own high-water mark (VmHWM), which the kernel keeps: a spike between two samples
    still counts. (getrusage's ru_maxrss would not do: it keeps the forked parent's size across exec.)"""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += high_water_rss(proc.pid) or proc.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def high_water_rss(pid: int) -> int | None:
    """A live process's peak RSS since it started (exec), from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None  # not Linux, or gone


@dataclass
class Watched:
    returncode: int
    peak_rss: int  # bytes: the process tree's peak RSS, as last sampled


def reset_peak_rss(pid: int) -> None:
    """Start a process's high-water mark (VmHWM) again from its current size (Linux >= 4.0), so that a served
    worker's peak is counted per command; where that is not possible its peak since start counts."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def watch(proc: subprocess.Popen, on_tick: Callable[[], None] | None = None, *, every: float = 1.0,
          sample: float = 0.1, reply: IO[str] | None = None) -> Watched:
    """Wait for `proc` to exit, or with `reply` (the pipe a served worker answers on) for its one-line answer, an
    exit code; sampling its process tree's peak RSS every `sample` seconds and calling `on_tick` every `every`
    seconds. A worker that dies before answering gives its own exit code."""
    peak = 0
    last_tick = time.monotonic()
    while True:
        peak = max(peak, tree_peak_rss(proc.pid))
        if reply is None:
            try:
                return Watched(proc.wait(timeout=sample), peak)
            except subprocess.TimeoutExpired:
                pass
        elif select.select([reply], [], [], sample)[0]:
            line = reply.readline()
            if line.strip().lstrip("-").isdigit():  # answered: its high-water mark still holds the command's peak
                return Watched(int(line), max(peak, tree_peak_rss(proc.pid)))
            return Watched(proc.wait(), peak)
        if on_tick is not None and time.monotonic() - last_tick >= every:
            last_tick = time.monotonic()
            on_tick()
