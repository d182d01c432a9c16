"""Publisher to a local folder laid out like the Hub: <root>/<namespace>/<repo>/<files>.

Files are copies (reflinks where the filesystem can make them), never hard links: editing a published file must
not touch the work dir's copy that later builds reuse. Each file is written under a temp name unique to this
process and renamed into place: the files, then quantforge.json, then the card (README.md), so that two builds
publishing into one folder do not collide, a reader never sees a half-copied file, a manifest never names a file
that is not there yet, and a card never shows without its files. A publish killed mid-copy leaves its temp file
(`.NAME.PID-xxxxxxxx.partial`); every publish first removes those of processes that are gone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PublishError
from ..store import NO_SPACE, disk_full, sha256_file
from .copies import HeldFile, folder_listing
from .publisher import PublishResult
from .record import REPO_MANIFEST

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
_FICLONE = 0x40049409  # ioctl: share the source's blocks (btrfs, xfs); a real copy elsewhere


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass
        shutil.copyfileobj(fin, fout, 1 << 22)
        fout.flush()
        os.fsync(fout.fileno())


def _publish_order(names: list[str]) -> list[str]:
    # the artifacts first, then the manifest, the card last: a README.md in the folder means its files are there
    return sorted(names, key=lambda n: (n == CARD_FILE, n == REPO_MANIFEST, n))


# the temp name of a file being copied in: .NAME.PID-RANDOM.partial, beside where NAME goes
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})-[0-9a-f]{8}\.partial")


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def _writer_alive(pid: int) -> bool:
    """Whether the process that named a temp file may still be writing it (this one may be, from another thread;
    a zombie has stopped writing for good)."""
    import psutil

    if pid == os.getpid():
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's process: it exists
        return True


def remove_debris(folder: Path) -> list[str]:
    """Delete what publishes killed mid-copy left in a repo folder: only files named as this module names its temp
    files, and only those whose writer is gone (another build may be publishing into the folder right now). The
    names removed, relative to `folder`."""
    removed = []
    for path in sorted(folder.rglob(".*.partial")) if folder.is_dir() else ():
        match = _PARTIAL.fullmatch(path.name)
        if match is None or not path.is_file() or path.is_symlink() or _writer_alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another publish removed it first
            continue
        removed.append(path.relative_to(folder).as_posix())
    if removed:
        log.info("%s: removed %d partial file(s) of publishes that did not finish: %s", folder, len(removed),
                 ", ".join(removed))
    return removed


class LocalDirPublisher:
    def __init__(self, root: Path):
        self.root = Path(root)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def publish(self, repo_id: str, files: dict[str, tuple[Path, str]], *, private: bool,
                message: str, preuploaded: Mapping[str, Any] | None = None, delete: Sequence[str] = (),
                blobs: Mapping[str, str] | None = None) -> PublishResult:
        if preuploaded:  # uploads ahead are planned for the Hub only (publish/upload.py)
            raise PublishError(f"{repo_id}: a folder cannot take files uploaded ahead")
        dest = self.repo_dir(repo_id)
        uploaded, unchanged, deleted = [], [], []
        order = _publish_order(list(files))
        tmp: Path | None = None
        try:
            remove_debris(dest)
            dest.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(order):
                path, sha = files[name]
                target = dest / name
                if name == CARD_FILE:  # the files of types no longer declared go before the card is replaced
                    for gone in delete:
                        if (dest / gone).is_file():
                            (dest / gone).unlink()
                            deleted.append(gone)
                if target.is_file() and target.stat().st_size == path.stat().st_size and sha256_file(target) == sha:
                    unchanged.append(name)
                    continue
                tmp = _temp_name(target)
                try:
                    _copy(path, tmp)
                except OSError as exc:
                    if exc.errno in NO_SPACE:
                        tmp.unlink(missing_ok=True)  # first, so that the message says what is really free
                        tmp = None
                        need = sum(files[n][0].stat().st_size for n in order[i:])
                        raise disk_full(dest, need, f"publishing {repo_id}") from None
                    raise
                os.replace(tmp, target)  # readers never see a half-copied file
                tmp = None
                uploaded.append(name)
        except OSError as exc:
            raise PublishError(f"cannot publish {repo_id} to {dest}: {exc}") from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return PublishResult(str(dest), uploaded, unchanged, deleted=deleted)

    def read_manifest(self, repo_id: str) -> dict[str, Any] | None:
        path = self.repo_dir(repo_id) / REPO_MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # unreadable: no record, so the repo is rebuilt and rewritten
            log.warning("%s: %s; taken as no record", path, exc)
            return None
        return data if isinstance(data, dict) else None

    def held(self, repo_id: str, hashes: Collection[str] = ()) -> dict[str, HeldFile] | None:
        """The repo folder's files by size (a stat each), sha256 read for the names in `hashes`; publishes' temp
        files aside. None when there is no such folder."""
        return folder_listing(self.repo_dir(repo_id), hashes, skip=lambda name: _PARTIAL.fullmatch(name) is not None)
