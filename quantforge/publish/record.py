"""What a published repo records of its own making, beside the card: enough for a later run with no work dir.

quantforge.json's `build` section keeps the publish step's key and, for every step upstream of it, what that step
left (kind, key, params, tools, data and file hashes; never a local path): core/staleness.py reads them back as
*recorded* outputs, so that a fresh runner re-gates, re-cards or adds a type without rebuilding what is recorded.
Its `files` section lists every file quantforge put in the repo, with its sha256, its size and (for a file small
enough to be a regular git file) its git blob id: what a publish may delete when a type is no longer declared
(never a file a person added), what it compares when the bytes themselves are not on this runner, and what plan
and build check the published copy against (publish/copies.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..card import CARD_FILE, public_text_name
from ..core.step import StepOutput

REPO_MANIFEST = "quantforge.json"  # source commit, parameters, metrics, file hashes: the basis for skip-unchanged
# The Hub keeps larger files in LFS (compared by sha256); a smaller one may be a regular git file, compared by its
# git blob id, which is all the Hub's listing gives of it
REGULAR_FILE_MAX_BYTES = 10 << 20
# Files every repo has, rewritten by each publish: never "removed"
ALWAYS_WRITTEN = (CARD_FILE, REPO_MANIFEST)


def git_blob_sha1(path: Path) -> str:
    """The id git (and the Hub) gives a regular file's content."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def public_data(value: Any) -> Any:
    """Step data as a published manifest may hold it: no local paths (a text file by its name alone, `path`
    entries dropped)."""
    if isinstance(value, dict):
        return {k: public_text_name(v) if k == "dataset" and isinstance(v, str) else public_data(v)
                for k, v in value.items() if k != "path"}
    if isinstance(value, list):
        return [public_data(v) for v in value]
    return value


def step_record(output: StepOutput) -> dict[str, Any]:
    """What a repo keeps of one upstream step's output: a manifest without its files' bytes."""
    manifest = output.manifest
    params = public_data(dict(manifest.get("params") or {}))
    if "digest" in params:  # a local source: named by its content, never by the folder written in targets.yaml
        params.pop("source", None)
    return {"kind": manifest.get("kind"), "key": manifest.get("key"), "label": manifest.get("label"),
            "params": params, "tools": dict(manifest.get("tools") or {}),
            "data": public_data(dict(manifest.get("data") or {})),
            "files": {name: {k: v for k, v in meta.items() if k in ("size", "sha256")}
                      for name, meta in (manifest.get("files") or {}).items()}}


def recorded_files(previous: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """name -> {sha256, blob?} of the files a repo's quantforge.json says quantforge put there."""
    files = (previous or {}).get("files")
    if not isinstance(files, dict):
        return {}
    return {name: dict(meta) for name, meta in files.items() if isinstance(name, str) and isinstance(meta, dict)}


def file_entries(files: Mapping[str, tuple[Path, str]], ahead: Mapping[str, str],
                 previous: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The `files` section for a publication of `files` (name -> (path, sha256)) and the objects uploaded ahead
    (name -> sha256). A small file here gets its git blob id; one that is not here (its step was recorded, not
    built) keeps the id the previous record gave the same bytes."""
    before = recorded_files(previous)
    out: dict[str, dict[str, Any]] = {}
    for name, (path, sha256) in files.items():
        if name in ALWAYS_WRITTEN:
            continue
        entry: dict[str, Any] = {"sha256": sha256}
        if path.is_file():
            entry["size"] = path.stat().st_size  # what plan and build compare the published copy with
            if entry["size"] <= REGULAR_FILE_MAX_BYTES:
                entry["blob"] = git_blob_sha1(path)
        elif before.get(name, {}).get("sha256") == sha256:
            entry.update({k: before[name][k] for k in ("blob", "size") if k in before[name]})
        out[name] = entry
    out.update({name: {"sha256": sha256} for name, sha256 in ahead.items()})
    return dict(sorted(out.items()))


def known_blobs(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {name: meta["blob"] for name, meta in entries.items() if "blob" in meta}


def removed_files(previous: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """Files the previous publication made that this one no longer does (a type removed from targets.yaml): only
    what the repo's own record lists, so a file a person added is never among them."""
    return sorted(name for name in recorded_files(previous) if name not in now and name not in ALWAYS_WRITTEN)
