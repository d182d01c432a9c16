"""Source models: a local checkpoint folder, or a Hub repo at a revision resolved to a commit sha.

A source is keyed by the content of the files a build reads, never by where they are or which commit holds them:
- a Hub revision (branch or tag) is resolved at plan time, in one request, to its commit and to the content id of
  every file (the LFS sha256 of weights, the git blob id of configs and tokenizer files); the key holds those ids,
  the commit is provenance. A commit that edits only the README (or other files no step reads) makes nothing stale.
- a local folder is keyed by a digest of its files' contents (hashes are memoized by size and mtime, so an
  unchanged 15 GB folder is not re-read every plan).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..card import SourceFacts
from ..chat_template import has_chat_template
from ..config.schema import ModelTarget, Targets, is_local_source
from ..core.plan import upstream_of_kind
from ..core.registry import Estimates, step_kind
from ..core.staleness import published_record
from ..core.step import PlanContext, Reason, Step, StepContext
from ..data import portable_path
from ..errors import BadInputError, SourceError
from ..store import NO_SPACE, canonical_json, disk_full, sha256_file, write_json_atomic
from ..toolchains.hub_protocol import hub_transfers
from .rates import DOWNLOAD_RATE, HASH_RATE

# What a conversion or quantization needs: weights as safetensors, configs, tokenizer files, chat templates.
DEFAULT_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja",
                          "README.md", "LICENSE*"]
REMOTE_CODE_PATTERNS = ["*.py"]
# Downloaded for the card, but read by no step that makes or measures an artifact: not part of a Hub source's key
# (the card quotes the source card as of the build that published it)
UNKEYED_PATTERNS = ["README.md", "*.md", "LICENSE*", "NOTICE*", "USE_POLICY*", ".gitattributes"]
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def allow_patterns(model: ModelTarget) -> list[str]:
    patterns = list(model.allow_patterns or DEFAULT_ALLOW_PATTERNS)
    if model.trust_remote_code:
        patterns += [p for p in REMOTE_CODE_PATTERNS if p not in patterns]
    return patterns


def source_step(model: ModelTarget, targets: Targets, context: PlanContext) -> Step:
    patterns = allow_patterns(model)
    # an existing folder is a local source even without ./ (as transformers decides), else a Hub repo id
    if is_local_source(model.source) or targets.resolve_path(model.source).is_dir():
        folder = targets.resolve_path(model.source)
        gaps = checkpoint_gaps(folder)
        if gaps:  # now, not after minutes of tokenizing
            raise SourceError(f"{model.name}: source folder {folder} {gaps}")
        digest = context.memo(f"local:{folder}", lambda: local_digest(folder, patterns, context.work.root))
        # keyed by its content and its path as written (relative to the targets file), never the absolute folder
        params: dict[str, Any] = {"source": portable_path(model.source), "digest": digest}
        local: dict[str, Any] = {"folder": str(folder), "files": _local_sizes(folder, patterns)}
    else:
        revision = context.memo(f"hub:{model.source}@{model.revision}",
                                lambda: hub_revision(model.source, model.revision, offline=context.offline))
        files = {n: f for n, f in revision.files.items() if _matches(Path(n), patterns)}
        keyed = {n: f.content_id for n, f in sorted(files.items()) if not _matches(Path(n), UNKEYED_PATTERNS)}
        params = {"source": model.source, "allow_patterns": patterns, "files": keyed}
        local = {"commit": revision.commit, "files": {n: f.size for n, f in files.items()}}
    return Step(kind="source", label=f"{model.name}:source", params=params, model=model.name, local=local)


# What a build reads of a checkpoint: its config, its weights and its tokenizer (one of these files)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def checkpoint_gaps(folder: Path) -> str:
    """What a local checkpoint folder lacks of what a build reads, as the end of a sentence ("has no config.json,
    no weight files (*.safetensors, *.bin)"); empty when nothing is missing."""
    if not folder.is_dir():
        return "does not exist" if not folder.exists() else "is not a folder"
    names = [p.name for p in folder.iterdir() if p.is_file()]
    missing = [what for what, patterns in (("config.json", ("config.json",)), ("weight files", WEIGHT_PATTERNS),
                                           ("tokenizer", TOKENIZER_PATTERNS))
               if not any(fnmatch.fnmatch(name, pattern) for name in names for pattern in patterns)]
    shown = {"config.json": "no config.json", "weight files": f"no weight files ({', '.join(WEIGHT_PATTERNS)})",
             "tokenizer": f"no tokenizer ({', '.join(TOKENIZER_PATTERNS)})"}
    return f"has {', '.join(shown[m] for m in missing)}: not a Hugging Face checkpoint" if missing else ""


def local_source_gaps(targets: Targets) -> list[tuple[int, str]]:
    """(model index, what its local source folder lacks) for every model whose source folder is incomplete here:
    what `quantforge validate` refuses."""
    return [(i, f"{model.source}: {gaps}") for i, model in enumerate(targets.models)
            if (is_local_source(model.source) or targets.resolve_path(model.source).is_dir())
            and (gaps := checkpoint_gaps(targets.resolve_path(model.source)))]


def hub_commit(step: Step) -> str | None:
    """The commit a Hub source step was resolved to (provenance, not part of its key); None for a local source."""
    return step.local.get("commit")


def same_files_notes(steps: Iterable[Step]) -> list[str]:
    """For each repo that is up to date though its Hub source moved to a new commit (one that changed no file a
    build reads): a line saying so, for `plan`."""
    notes = []
    for step in steps:
        record = published_record(step)
        source = upstream_of_kind(step, "source") if record is not None else None
        commit = hub_commit(source) if source is not None else None
        if record is not None and commit and record.key == step.key and record.source_commit not in (None, commit):
            notes.append(f"{step.model}: source: new commit {commit[:12]}, same files (published from "
                         f"{str(record.source_commit)[:12]}): nothing to rebuild")
    return list(dict.fromkeys(notes))


def content_digest(step: Step) -> str:
    """A source's content as one digest: a local folder's, or that of a Hub source's keyed files (what a GGUF
    records as its source: the same files give the same digest, whichever commit holds them)."""
    if "digest" in step.params:
        return step.params["digest"]
    return hashlib.sha256(canonical_json(step.params["files"]).encode()).hexdigest()


def source_folder(step: Step) -> Path | None:
    """A local source step's folder on this machine (None for a Hub source)."""
    folder = step.local.get("folder")
    return Path(folder) if folder else None


def plan_config(step: Step) -> dict[str, Any] | None:
    """A source's config.json where it is on this machine at plan time (a local folder, or a Hub source's file in
    the HF cache), for checks that can refuse settings before anything runs; None where it is not, or unreadable."""
    folder = source_folder(step)
    if folder is not None:
        config_file: str | Path | None = folder / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        config_file = try_to_load_from_cache(step.params["source"], "config.json", revision=hub_commit(step))
    if not isinstance(config_file, str | Path):  # None, or the "known not to exist" marker
        return None
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _local_sizes(folder: Path, patterns: list[str]) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and _matches(p.relative_to(folder), patterns)}


def local_digest(folder: Path, patterns: list[str], work_root: Path) -> str:
    if not folder.is_dir():
        raise SourceError(f"source folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SourceError(f"source folder {folder} has no config.json: not a Hugging Face checkpoint")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _matches(p.relative_to(folder), patterns))
    memo_path = work_root / "state" / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entries = []
    for path in files:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = memo.get(str(path))
        if not cached or cached[:2] != stamp:
            cached = [*stamp, sha256_file(path)]
            memo[str(path)] = cached
        entries.append([str(path.relative_to(folder)), cached[2]])
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise disk_full(memo_path.parent, 4096) from None
        raise
    write_json_atomic(memo_path, memo)
    return hashlib.sha256(canonical_json(entries).encode()).hexdigest()


def external_folder(kind: str, path: Path, context: PlanContext) -> Step:
    """The step standing for a checkpoint folder made elsewhere (`quantforge eval DIR`): keyed by its content alone,
    so that the same folder evaluated from elsewhere is the same artifact; `local` says where it is now."""
    try:
        digest = context.memo(f"local:{path}", lambda: local_digest(path, list(DEFAULT_ALLOW_PATTERNS),
                                                                     context.work.root))
    except OSError as exc:  # a file that cannot be read (permissions, a broken link)
        raise BadInputError(f"{path}: cannot read {exc.filename or 'a file'}: {exc.strerror or exc}") from None
    return Step(kind=kind, label=f"{path.name}:artifact", params={"digest": digest}, local={"path": str(path)})


def _matches(rel: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel.as_posix(), p) or fnmatch.fnmatch(rel.name, p) for p in patterns)


@dataclass(frozen=True)
class HubFile:
    size: int
    content_id: str  # the LFS sha256 of a large file, the git blob sha1 of a regular one (as the HF cache names blobs)


@dataclass(frozen=True)
class HubRevision:
    commit: str
    files: dict[str, HubFile]


def resolve_hub_revision(repo_id: str, revision: str, *, offline: bool = False) -> str:
    """Branch, tag or sha -> the commit sha, from the Hub (or the local HF cache when offline)."""
    return hub_revision(repo_id, revision, offline=offline).commit


def hub_revision(repo_id: str, revision: str, *, offline: bool = False) -> HubRevision:
    """The commit and each file's size and content id, in one request: the ids key the source, the sizes tell a
    nightly plan how much disk a model's build needs before anything is downloaded. Offline, both come from the
    cached snapshot (whose blobs the HF cache names by the same ids)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline:
        commit = revision if _SHA_RE.match(revision) else _cached_ref(repo_id, revision)
        return HubRevision(commit, _cached_files(repo_id, commit))
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such model repo (or it is private and no token was given)") from None
    except RevisionNotFoundError:
        raise SourceError(f"{repo_id}: no revision {revision!r}") from None
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) == 401:
            raise SourceError(f"{repo_id}: the Hub refused the token (HTTP 401); set HF_TOKEN to a valid token or "
                              "run hf auth login") from None
        raise SourceError(f"{repo_id}@{revision}: the Hub answered {_first_line(exc)}; use --offline to build "
                          "from the local Hugging Face cache") from None
    except Exception as exc:  # httpx's transport errors are not OSErrors; all mean the Hub cannot be reached
        raise SourceError(f"{repo_id}@{revision}: cannot reach the Hub to resolve the revision "
                          f"({type(exc).__name__}: {_first_line(exc)}); use --offline to build from the local "
                          "Hugging Face cache") from None
    if not info.sha:
        raise SourceError(f"{repo_id}@{revision}: the Hub returned no commit sha")
    files = {}
    for sibling in info.siblings or ():
        content_id = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        if sibling.size is None or not content_id:
            raise SourceError(f"{repo_id}@{revision}: the Hub gave no size or content id for {sibling.rfilename}, "
                              "which a build is keyed by; try again, or use --offline with a cached snapshot")
        files[sibling.rfilename] = HubFile(sibling.size, content_id)
    return HubRevision(info.sha, files)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _cached_files(repo_id: str, commit: str) -> dict[str, HubFile]:
    """A cached snapshot's files: each is a link to a blob named by its content id (huggingface_hub's layout)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshot = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    return {p.relative_to(snapshot).as_posix(): HubFile(p.stat().st_size, p.resolve().name)
            for p in sorted(snapshot.rglob("*")) if p.is_file()}


def _cached_ref(repo_id: str, revision: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip()
    except OSError:
        raise SourceError(f"{repo_id}@{revision}: offline, and the local Hugging Face cache has no such "
                          "revision; run once online or pin the commit sha") from None


def _facts_kept(step: Step, manifest: dict[str, Any], verify: bool = False) -> list[Reason]:
    """An output made before the source step kept the card's facts is described again (same key: nothing
    made from it is stale)."""
    return [] if "facts" in manifest.get("data", {}) else [Reason("redescribe", new="facts")]


def _fetch_seconds(step: Step, size: Any, cores: int, gpu: bool) -> float:
    """Hashing every file; a Hub source is downloaded first."""
    return size.total_bytes / HASH_RATE + (size.total_bytes / DOWNLOAD_RATE if "commit" in step.params else 0.0)


@step_kind("source", version="1", check=_facts_kept, estimates=Estimates(seconds=_fetch_seconds))
def run_fetch(step: Step, ctx: StepContext) -> dict[str, Any]:
    """The source step's work: make the checkpoint available locally and describe it."""
    params = step.params
    if "digest" in params:
        path = Path(step.local["folder"])
    else:
        from huggingface_hub import snapshot_download

        try:
            # into the shared HF cache: resumable, deduplicated, and not copied into the work dir; over HTTP as
            # tested, unless QUANTFORGE_HUB_XET=1
            with hub_transfers():
                path = Path(snapshot_download(params["source"], revision=step.local["commit"],
                                              allow_patterns=params["allow_patterns"]))
        except Exception as exc:  # huggingface_hub raises many types; all mean the same here
            raise SourceError(f"{params['source']}@{step.local['commit'][:12]}: download failed: {exc}") from exc
        if not any(path.glob("*.safetensors")):
            raise SourceError(f"{params['source']} has no *.safetensors weights; add the weight files' pattern "
                              "to allow_patterns if it ships only .bin files")
    return {"path": str(path), **({"commit": step.local["commit"]} if "files" in params else {}),
            **describe_checkpoint(path), "facts": SourceFacts.read(path).to_json()}


def describe_checkpoint(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}/config.json: cannot read ({exc})") from None
    return {
        "architectures": config.get("architectures") or [],
        "model_type": config.get("model_type"),
        "has_chat_template": has_chat_template(path),
    }


