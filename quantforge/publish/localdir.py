"""Publisher to a local folder laid out like the Hub: <root>/<namespace>/<repo>/<files>.

Files are copies (reflinks where the filesystem can make them), never hard links: editing a published file must
not touch the work dir's copy that later builds reuse. Each file is written under a temp name unique to this
process and renamed into place, the card (README.md) last, so that two builds publishing into one folder do not
collide, a reader never sees a half-copied file, and a repo never shows a card without its files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PublishError
from ..store import NO_SPACE, disk_full, sha256_file
from . import REPO_MANIFEST, PublishResult

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
    # the artifacts first, the card last: a README.md in the folder means its files are there
    return sorted(names, key=lambda n: (n == CARD_FILE, n))


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
                tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
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

    def missing(self, repo_id: str, files: dict[str, str]) -> list[str]:
        dest = self.repo_dir(repo_id)
        # existence only, to keep `plan` cheap; publish() compares hashes before it skips a file
        return [name for name in files if not (dest / name).is_file()]
