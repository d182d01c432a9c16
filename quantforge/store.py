"""The work directory: where step outputs live, by cache key, and how they are committed.

Layout:
    <work>/steps/<kind>/<key>/      a finished step's output; `manifest.json` inside is written last
    <work>/tmp/<kind>-<key>-<pid>/  a step being built; renamed into `steps/` when complete
    <work>/state/<label>.json       what the last successful run of a step label used (for "why stale")
    <work>/logs/<label>.log         the latest log of each step's external tools
    <work>/reports/                 one JSON report per build, plus latest.json
    <work>/.lock                    held by the running build

A folder without its manifest is a miss, never a hit; a killed build leaves only `tmp/` debris, cleared at the
next start.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BadInputError, DiskFull, WorkDirLocked
from .figures import format_size

MANIFEST = "manifest.json"
# what an evicted output leaves behind: its manifest under another name (never a cache hit), for the steps that
# read only its recorded data (core.step.Step.data_only)
EVICTED = "evicted.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the filesystem holding `path` (or its nearest existing parent)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    real = os.path.realpath(where)
    best = ("?", "/")
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                device, mount = line.split()[:2]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (device, mount)
    except OSError:
        pass
    return best


def disk_full(path: Path, need_bytes: int, what: str = "") -> DiskFull:
    """The error for a write to `path` that ran out of space; `need_bytes`: about what the work needs."""
    device, mount = mount_of(path)
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        free = 0
    return DiskFull(f"{what + ': ' if what else ''}no space left on device {device} ({path}): need about "
                    f"{format_size(max(need_bytes, 1))}, {format_size(free)} free on {mount}")


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, so that JSON output is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(finite_json(data), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # never leave a half-written (or empty) temp file behind
        if exc.errno in NO_SPACE:
            raise disk_full(path, len(text.encode())) from None
        raise


def safe_label(label: str) -> str:
    return label.replace("/", "__").replace(":", "_")


class WorkDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():  # every write under it would fail with ENOTDIR
            raise BadInputError(f"work dir {self.root} is a file, not a folder; pass --work-dir a folder")

    # ---- layout
    def step_dir(self, kind: str, key: str) -> Path:
        return self.root / "steps" / kind / key

    def log_path(self, label: str) -> Path:
        return self.root / "logs" / f"{safe_label(label)}.log"

    def state_path(self, label: str) -> Path:
        return self.root / "state" / f"{safe_label(label)}.json"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    # ---- cache
    def lookup(self, kind: str, key: str) -> dict | None:
        """The committed manifest of a step output, or None (absent or half-written)."""
        manifest = self.step_dir(kind, key) / MANIFEST
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if data.get("key") == key else None

    @contextmanager
    def staging(self, kind: str, key: str) -> Iterator[Path]:
        """A fresh temp folder for a step's output; removed again if the step does not commit it."""
        tmp = self.root / "tmp" / f"{kind}-{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, staged: Path, kind: str, key: str, manifest: dict) -> Path:
        """Write the manifest last, then move the folder into place in one rename."""
        write_json_atomic(staged / MANIFEST, manifest)
        final = self.step_dir(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a half-written leftover (no valid manifest): lookup() said miss
            shutil.rmtree(final)
        os.replace(staged, final)
        return final

    def evict(self, kind: str, key: str) -> int:
        """Delete a step's output (manifest first, so it is a miss at once), keeping its manifest as evicted.json
        for the steps that read only its data; the bytes freed."""
        folder = self.step_dir(kind, key)
        manifest = folder / MANIFEST
        try:
            record = manifest.read_bytes()
        except OSError:
            return 0  # nothing committed here (or evicted already)
        freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        manifest.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / EVICTED).write_bytes(record)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)  # no record: a step reading its data rebuilds it instead
        return freed

    def evicted(self, kind: str, key: str) -> dict | None:
        """The manifest an evicted output left behind (its data, no files), or None."""
        try:
            data = json.loads((self.step_dir(kind, key) / EVICTED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def last_state(self, label: str) -> dict | None:
        try:
            return json.loads(self.state_path(label).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def record_state(self, label: str, state: dict) -> None:
        path = self.state_path(label)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, state)

    def clear_debris(self) -> None:
        shutil.rmtree(self.root / "tmp", ignore_errors=True)

    # ---- lock
    def check_unlocked(self) -> None:
        """Raise WorkDirLocked when a build holds the work dir (for commands that only read it)."""
        if not (self.root / ".lock").exists():
            return
        with self.locked():
            pass

    @contextmanager
    def locked(self) -> Iterator[None]:
        lock_path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise disk_full(lock_path, 4096) from None
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise WorkDirLocked(f"work dir {self.root} is in use by pid {holder}; wait for that build "
                                    "or use another --work-dir") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise disk_full(lock_path, 16) from None
                raise
            yield
        finally:
            os.close(fd)  # closing releases the flock; a killed process releases it too
