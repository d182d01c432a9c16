"""Size-capped disks for tests: a tmpfs of a given size (root can mount one here, and CI runs as root)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tiers import require_slow


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    require_slow("mounts a size-capped tmpfs")
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root (CI and the dev machines run as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, limit: int | None = None) -> None:
    """Write zeros into `path` until the disk is full (or `limit` bytes are written)."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        while limit is None or written < limit:
            try:
                written += f.write(bytes(4096))
            except OSError:
                return


@contextmanager
def highest(measure: Callable[[], int]) -> Iterator[list[int]]:
    """`measure()` sampled every 10 ms in a thread while the block runs; the list's one item is the highest value
    seen (read it after the block)."""
    most = [measure()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            most[0] = max(most[0], measure())
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield most
    finally:
        done.set()
        thread.join()
