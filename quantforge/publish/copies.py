"""Whether a published repo still holds what was published, cheapest check first.

    every plan and build   each file's size against what was recorded: a stat per file in a folder; on the Hub
                           the one listing request the check makes, which also carries each LFS file's sha256,
                           compared too (no download)
    --verify-published     also a folder's files by sha256 (every byte read); on the Hub the same listing, and a
                           repo judged by its quantforge.json alone (no work dir: a nightly) is listed at all only
                           then, so that a plain nightly plan stays at one request per repo

A difference is a stale reason (`published file changed: NAME (...)`, or `published copy changed or missing`), and
the publish step runs again: the publisher rewrites what differs, from the work dir's copies (rebuilt first when
they are gone). A file the repo holds and its publication does not list (left by a build of another type set, or
added by hand) is not a reason: `unlisted_files` names it, for `plan` to report. Hidden files and folders
(.gitattributes, .git/, .cache/) are not judged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config.destination import Destination
from ..core.step import Reason
from ..errors import PublishError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldFile:
    """A file as the destination holds it: its size, and its sha256 where that is known (read from a folder when
    asked; on the Hub, given for LFS files)."""

    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class ExpectedFile:
    """A file as its publication recorded it."""

    sha256: str
    size: int | None = None  # None: recorded by a quantforge that did not record sizes (then presence is checked)


class Holder(Protocol):
    """What a publisher offers the checks: `held(repo_id, hashes)` -> name -> HeldFile (sha256 read for the names
    in `hashes` where the destination cannot give it for free), or None when there is no such repo."""

    def held(self, repo_id: str, hashes: Collection[str] = ()) -> dict[str, HeldFile] | None: ...


def expected_from_step(data: Mapping[str, Any]) -> dict[str, ExpectedFile]:
    """What a cached publish step recorded it published: `files` (name -> sha256) and `sizes` (name -> bytes)."""
    sizes = data.get("sizes") or {}
    return {name: ExpectedFile(sha, sizes.get(name)) for name, sha in (data.get("files") or {}).items()}


def expected_from_record(record: Mapping[str, Any]) -> dict[str, ExpectedFile] | None:
    """What a repo's quantforge.json says the repo holds besides itself (`files`); None when it does not say (a
    record written before it did)."""
    files = record.get("files")
    if not isinstance(files, dict):
        return None
    out = {}
    for name, about in files.items():
        if isinstance(about, dict) and isinstance(about.get("sha256"), str):
            size = about.get("size")
            out[name] = ExpectedFile(about["sha256"], size if isinstance(size, int) else None)
    return out


def copy_problems(expected: Mapping[str, ExpectedFile], held: Mapping[str, HeldFile] | None) -> list[Reason]:
    """Why the held copy is not what was published: files missing, sizes that differ, and (where the holder gave a
    sha256) content that differs. Empty when it is."""
    held = held or {}
    missing = sorted(name for name in expected if name not in held)
    reasons = [Reason("published", new=missing)] if missing else []
    for name in sorted(expected):
        want, got = expected[name], held.get(name)
        if got is None:
            continue
        if want.size is not None and got.size != want.size:
            reasons.append(Reason("published-changed", name, old=want.size, new=got.size))
        elif got.sha256 is not None and got.sha256 != want.sha256:
            reasons.append(Reason("published-changed", name, old=want.sha256, new=got.sha256))
    return reasons


def judged(name: str) -> bool:
    """Whether a name in a repo is a file the checks look at: hidden ones (.gitattributes, .git/...) are not."""
    return not any(part.startswith(".") for part in name.split("/"))


# (destination, repo id) -> what it held when last listed in this process: `plan` asks the check and then the
# report of unlisted files; a listing of the Hub is a request
_HELD: dict[tuple[Destination, str], dict[str, HeldFile] | None] = {}


def held_files(holder: Holder, where: Destination, repo_id: str,
               hashes: Collection[str] = ()) -> dict[str, HeldFile] | None:
    """The destination's listing of a repo, read once per process (again when hashes are asked that it lacks)."""
    cached = _HELD.get((where, repo_id), False)
    if cached is False or (cached is not None and any(n in cached and cached[n].sha256 is None for n in hashes)):
        cached = _HELD[(where, repo_id)] = holder.held(repo_id, hashes)
    return cached


def was_listed(where: Destination, repo_id: str) -> bool:
    """Whether this process has listed the repo (and held_files answers without a request)."""
    return (where, repo_id) in _HELD


def forget_held(where: Destination | None = None, repo_id: str | None = None) -> None:
    """Drop what was listed (of one repo: it was just published; of all: a long-lived process)."""
    if where is None:
        _HELD.clear()
    else:
        _HELD.pop((where, repo_id or ""), None)


def check_copy(holder: Holder, where: Destination, repo_id: str, expected: Mapping[str, ExpectedFile], *,
               verify: bool) -> list[Reason]:
    """copy_problems of the repo as held now; with `verify`, content too (read where it is not free)."""
    try:
        held = held_files(holder, where, repo_id, hashes=list(expected) if verify else ())
    except (OSError, PublishError) as exc:
        # unreachable destination: trust the record rather than fail `plan` (the next publish re-checks hashes)
        log.warning("%s: cannot check the published copy (%s)", repo_id, exc)
        return []
    return copy_problems(expected, held)


def unlisted(expected: Collection[str], held: Mapping[str, HeldFile] | None, *, manifest: str) -> list[str]:
    """Names `held` has that `expected` (and the manifest itself) does not, hidden ones aside."""
    return sorted(name for name in held or {} if name not in expected and name != manifest and judged(name))


def folder_listing(folder: Path, hashes: Collection[str],
                   skip: Callable[[str], bool]) -> dict[str, HeldFile] | None:
    """A folder repo's files (`skip(name)`: a file not to list, e.g. a publish's temp file), sizes from a stat and
    sha256 read for the names in `hashes` (memoized by size and modification time in this process)."""
    if not folder.is_dir():
        return None
    out = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or skip(path.name):
            continue
        name = path.relative_to(folder).as_posix()
        st = path.stat()
        out[name] = HeldFile(st.st_size, _sha256(path, st.st_size, st.st_mtime_ns) if name in hashes else None)
    return out


_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    from ..store import sha256_file

    key = (str(path), size, mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]
