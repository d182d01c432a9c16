"""The publisher contract: what every destination's publisher does (publish/hub.py, publish/localdir.py), and what
it reports having done."""

from __future__ import annotations

import base64
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import copies


@dataclass(frozen=True)
class PreuploadedFile:
    """An LFS object uploaded ahead of its commit: what the commit needs of it without the local file (its
    sha256 and size, and the first 512 bytes huggingface_hub's upload info carries)."""

    sha256: str
    size: int
    sample: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "sample": base64.b64encode(self.sample).decode()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PreuploadedFile:
        return cls(data["sha256"], int(data["size"]), base64.b64decode(data.get("sample", "")))


@dataclass(frozen=True)
class PublishResult:
    """What a publisher did: where the repo is, which files it sent and which it found already there."""

    location: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    commit: str | None = None  # the Hub commit made, when one was
    deleted: list[str] = field(default_factory=list)  # files removed (types no longer declared)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Publisher(Protocol):
    def publish(self, repo_id: str, files: dict[str, tuple[Path, str]], *, private: bool, message: str,
                preuploaded: Mapping[str, PreuploadedFile] | None = None, delete: Sequence[str] = (),
                blobs: Mapping[str, str] | None = None) -> PublishResult:
        """Make the repo hold `files` (name -> (path, sha256)) and the files uploaded ahead (the Hub only), and no
        longer hold `delete`. A file whose local path is absent is one the destination's record says it holds
        (its data was recorded, its bytes are not here); `blobs` gives the git blob ids recorded of such files."""
        ...

    def held(self, repo_id: str, hashes: Collection[str] = ()) -> dict[str, copies.HeldFile] | None:
        """What the repo holds: name -> size and, where known (or read, for the names in `hashes`), sha256; None
        when there is no such repo (publish/copies.py)."""
        ...

    def read_manifest(self, repo_id: str) -> dict[str, Any] | None:
        """The repo's quantforge.json, in one request; None when the repo or the file does not exist."""
        ...
