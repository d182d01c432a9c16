"""Publisher to a local folder laid out like the Hub: <root>/<namespace>/<repo>/<files>."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import PublishError
from ..store import sha256_file


class LocalDirPublisher:
    def __init__(self, root: Path):
        self.root = Path(root)

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def publish(self, repo_id: str, files: dict[str, tuple[Path, str]], *, private: bool,
                message: str) -> dict[str, Any]:
        dest = self.repo_dir(repo_id)
        uploaded, unchanged = [], []
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for name, (path, sha) in sorted(files.items()):
                target = dest / name
                if target.is_file() and target.stat().st_size == path.stat().st_size and sha256_file(target) == sha:
                    unchanged.append(name)
                    continue
                tmp = target.with_name(f".{target.name}.partial")
                tmp.unlink(missing_ok=True)
                try:
                    # work-dir outputs are never modified after commit, so a hard link is a safe, free copy
                    os.link(path, tmp)
                except OSError:  # another filesystem, or links not allowed
                    shutil.copyfile(path, tmp)
                os.replace(tmp, target)  # readers never see a half-copied file
                uploaded.append(name)
        except OSError as exc:
            raise PublishError(f"cannot publish {repo_id} to {dest}: {exc}") from exc
        return {"location": str(dest), "uploaded": uploaded, "unchanged": unchanged}

    def missing(self, repo_id: str, files: dict[str, str]) -> list[str]:
        dest = self.repo_dir(repo_id)
        # existence only, to keep `plan` cheap; publish() compares hashes before it skips a file
        return [name for name in files if not (dest / name).is_file()]
