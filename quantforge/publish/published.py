"""What a destination holds and records of a publication: its quantforge.json (read once per process and repo:
a nightly plan costs one request per repo), the copy it holds against what was published, and the files it
holds that no publication lists."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..card import CARD_FILE
from ..config.destination import Destination
from ..core.step import Published, Reason, Step
from ..errors import PublishError
from ..store import WorkDir, sha256_file
from . import copies
from .destinations import destination, publisher_for
from .record import REPO_MANIFEST


def check_published(step: Step, manifest: dict[str, Any], verify: bool = False) -> list[Reason]:
    """Why the published copy no longer holds what the cached publish step recorded: files missing, of another
    size, or (where the destination gives it for free, or `verify`) of another sha256 (publish/copies.py)."""
    where = destination(step)
    return copies.check_copy(publisher_for(where), where, step.params["repo_id"],
                             copies.expected_from_step(manifest.get("data", {})), verify=verify)


def unlisted_files(step: Step, work: WorkDir) -> list[str] | None:
    """The files `step`'s repo holds that its publication does not list: left by a build that published another
    set of types into the same repo, or added by hand. `plan` reports them (a publish deletes only what a record
    lists as quantforge's: record.removed_files). The publication is the repo's quantforge.json, else what the work
    dir's publish step recorded. None when that cannot be told cheaply: no list of files, or a Hub repo not listed
    this run (a listing is a request, and a nightly plan makes one per repo)."""
    where, repo = destination(step), step.params["repo_id"]
    if where.hub and not copies.was_listed(where, repo):
        return None
    expected = copies.expected_from_record(_record(where, repo) or {})
    if not expected:
        cached = work.lookup(step.kind, step.key)
        expected = copies.expected_from_step(cached.get("data", {})) if cached else None
    if not expected:
        return None
    try:
        held = copies.held_files(publisher_for(where), where, repo)
    except (OSError, PublishError):
        return None
    return sorted(set(copies.unlisted(expected, held, manifest=REPO_MANIFEST)) - {CARD_FILE})


def unlisted_warnings(steps: Sequence[Step], work: WorkDir) -> list[dict[str, Any]]:
    """`plan`'s warnings: per publish step whose repo holds files its publication does not list, which."""
    return [{"step": s.label, "repo_id": s.params["repo_id"], "unlisted": names,
             "message": f"{s.params['repo_id']} holds {', '.join(names)}, which its publication does not list (left "
                        "by a build of other types, or added by hand)"}
            for s in steps if s.kind == "publish" and (names := unlisted_files(s, work))]


# (destination, repo id) -> the repo's quantforge.json (None: none there), read once per process: `build` asks
# several times (memory check, plan, report), and a nightly plan must cost one request per repo
_RECORDS: dict[tuple[Destination, str], dict[str, Any] | None] = {}


def _record(where: Destination, repo: str) -> dict[str, Any] | None:
    if (where, repo) not in _RECORDS:
        _RECORDS[(where, repo)] = publisher_for(where).read_manifest(repo)
    return _RECORDS[(where, repo)]


def published_record(step: Step, verify: bool = False) -> Published:
    """What the destination records of the last publication of `step`'s repo (see core.step.Published), and what
    differs in the copy it holds (a folder's sizes, always; the Hub's only with `verify`: a listing is a request)."""
    where, repo = destination(step), step.params["repo_id"]
    manifest = _record(where, repo) or {}
    build = manifest.get("build") or {}
    location = where.location(repo)
    if where.folder is not None and build and not _card_landed(where.folder / repo, build.get("card_sha256")):
        build = {}  # a Hub commit is atomic; a folder publish cut short before its card is not a publication
    problems: list[Reason] = []
    expected = copies.expected_from_record(manifest) if build.get("key") and (not where.hub or verify) else None
    if expected is not None:
        problems = copies.check_copy(publisher_for(where), where, repo, expected, verify=verify)
    records = build.get("records")
    commit = (manifest.get("source") or {}).get("commit") if isinstance(manifest.get("source"), dict) else None
    return Published(location=location, key=build.get("key"), steps=build.get("steps") or {},
                     data={"repo_id": repo, "to": step.params["to"], "location": location,
                           "published": "recorded at the destination"},
                     records=records if isinstance(records, dict) else {},
                     source_commit=commit if isinstance(commit, str) else None, problems=tuple(problems))


def previous_manifest(step: Step) -> dict[str, Any] | None:
    """The repo's quantforge.json as this process last read it (published_record reads it first)."""
    key = (destination(step), step.params["repo_id"])
    if key not in _RECORDS:
        published_record(step)
    return _RECORDS[key]


def _card_landed(folder: Path, sha256: str | None) -> bool:
    card = folder / CARD_FILE
    try:
        return sha256 is not None and card.is_file() and sha256_file(card) == sha256
    except OSError:
        return False


def forget_published() -> None:
    """Drop what was read of destinations (a long-lived process that publishes from elsewhere too)."""
    _RECORDS.clear()
    copies.forget_held()


def forget_repo(step: Step) -> None:
    """What was read of `step`'s repo is old: it was just published."""
    _RECORDS.pop((destination(step), step.params["repo_id"]), None)
    copies.forget_held(destination(step), step.params["repo_id"])
