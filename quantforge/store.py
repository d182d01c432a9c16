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

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import WorkDirLocked

MANIFEST = "manifest.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_label(label: str) -> str:
    return label.replace("/", "__").replace(":", "_")


class WorkDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

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
    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise WorkDirLocked(f"work dir {self.root} is in use by pid {holder}; wait for that build "
                                    "or use another --work-dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock; a killed process releases it too
