"""Publisher to the Hugging Face Hub: one commit per build, nothing uploaded twice, no empty commits.

Files already on the Hub with the same content are skipped (LFS files by sha256, regular files by git blob
sha1), and when nothing changed no commit is made. Transient failures (429, 5xx, dropped connections) are
retried with exponential backoff around each Hub call; a commit is atomic on the Hub, so a failure leaves
the repo as it was. The token comes from HF_TOKEN or `hf auth login` (huggingface_hub's own lookup) and is
never logged or put in a message. Files go up by the LFS protocol, not Xet, unless QUANTFORGE_HUB_XET=1
(toolchains/hub_protocol.py says why).

LFS files may go up ahead of their commit (`preupload`, huggingface_hub's preupload_lfs_files), each as soon as
it is ready, and be committed later by what was recorded of them (`PreuploadedFile`) once their local copies are
gone: publish/upload.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import PreuploadRejected, PublishError
from ..toolchains.hub_protocol import hub_transfers
from .copies import HeldFile
from .publisher import PreuploadedFile, PublishResult
from .record import REPO_MANIFEST, git_blob_sha1

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = {429, 500, 502, 503, 504}
_ABSENT = ("RepoNotFound", "EntryNotFound", "RevisionNotFound")


def preuploaded_addition(name: str, file: PreuploadedFile) -> CommitOperationAdd:
    """A commit operation for an LFS object uploaded earlier, by another process, whose local file may be gone.

    huggingface_hub has no public way to make one: CommitOperationAdd computes its upload info from bytes or a file,
    and create_commit leaves alone what preupload_lfs_files marked as uploaded through private attributes. So this
    builds one from empty bytes and gives it the object's upload info and preupload_lfs_files' marks (2.x). If a
    release changes them, tests/test_hub.py::test_a_preuploaded_object_is_committed_without_its_file fails.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
    op.upload_info = UploadInfo(size=file.size, sample=file.sample, sha256=bytes.fromhex(file.sha256))
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status in RETRY_STATUS
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x ships its HTTP client as httpx2
        try:
            transport_error = __import__(module).TransportError
        except (ImportError, AttributeError):
            continue
        if isinstance(exc, transport_error):
            return True
    return isinstance(exc, ConnectionError | TimeoutError)


class HubPublisher:
    def __init__(self, *, endpoint: str | None = None, token: str | None = None, retries: int = 5,
                 backoff_seconds: float = 2.0, sleep: Callable[[float], None] = time.sleep):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token)
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.sleep = sleep

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                with hub_transfers():  # the LFS path the tests take, unless QUANTFORGE_HUB_XET=1
                    return fn()
            except Exception as exc:
                if _status(exc) in (401, 403):
                    raise PublishError(f"{what}: the Hub refused the token (HTTP {_status(exc)}); set HF_TOKEN to a "
                                       "token with write access to the namespace, or run hf auth login") from None
                if not _transient(exc) or attempt == self.retries:
                    error = PublishError(f"{what} failed: {_describe(exc)}")
                    error.status = _status(exc)
                    raise error from None
                wait = self.backoff_seconds * 2**attempt
                log.warning("%s: %s; retrying in %.1f s (%d/%d)", what, _describe(exc), wait, attempt + 1,
                            self.retries)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def remote_files(self, repo_id: str) -> dict[str, tuple[str | None, str | None]]:
        """path -> (lfs sha256, git blob sha1) of what the repo's main branch holds."""
        from huggingface_hub.errors import RepositoryNotFoundError

        def listing() -> dict[str, tuple[str | None, str | None]]:
            try:
                entries = self.api.list_repo_tree(repo_id, recursive=True)
                return {e.path: (e.lfs.sha256 if getattr(e, "lfs", None) else None, getattr(e, "blob_id", None))
                        for e in entries if hasattr(e, "blob_id")}
            except RepositoryNotFoundError:
                return {}

        return self._call(f"listing {repo_id}", listing)

    def _create(self, repo_id: str, private: bool) -> str:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # the build's own progress is on the console; tqdm bars would interleave
        return str(self._call(f"creating {repo_id}", lambda: self.api.create_repo(repo_id, private=private,
                                                                                   exist_ok=True)))

    def publish(self, repo_id: str, files: dict[str, tuple[Path, str]], *, private: bool, message: str,
                preuploaded: Mapping[str, PreuploadedFile] | None = None, delete: Sequence[str] = (),
                blobs: Mapping[str, str] | None = None) -> PublishResult:
        """`preuploaded`: LFS objects `preupload` sent ahead, committed by their record (no local file needed);
        `delete`: files to remove in the same commit; `blobs`: recorded git blob ids of files not on this machine."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        url = self._create(repo_id, private)
        remote = self.remote_files(repo_id)
        uploads: list[CommitOperationAdd | CommitOperationDelete] = []
        unchanged = []
        for name, (path, sha256) in sorted(files.items()):
            lfs_sha, blob_sha = remote.get(name, (None, None))
            here = path.is_file()
            blob = git_blob_sha1(path) if here and lfs_sha is None and blob_sha else (blobs or {}).get(name)
            if lfs_sha == sha256 or (lfs_sha is None and blob_sha and blob_sha == blob):
                unchanged.append(name)
            elif not here:  # recorded, not built here: only the repo had its bytes, and they changed
                raise PublishError(f"{repo_id}/{name} is not what its record says (sha256 {sha256[:12]}) and this "
                                   "build did not make it; build again with --ignore-published to remake it")
            else:
                uploads.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        ahead = []
        for name, file in sorted((preuploaded or {}).items()):
            if remote.get(name, (None, None))[0] == file.sha256:
                unchanged.append(name)
            else:
                uploads.append(preuploaded_addition(name, file))
                ahead.append(name)
        gone = [name for name in delete if name in remote]
        uploads += [CommitOperationDelete(path_in_repo=name) for name in gone]
        commit = None
        if uploads:
            try:
                info = self._call(f"committing to {repo_id}", lambda: self.api.create_commit(
                    repo_id, operations=uploads, commit_message=message))
            except PublishError as exc:
                gone = self._gone(repo_id, {name: preuploaded[name] for name in ahead}) \
                    if ahead and exc.status is not None and 400 <= exc.status < 500 else []
                if gone:
                    raise PreuploadRejected(f"{exc}: the Hub no longer holds {', '.join(gone)}, uploaded ahead of this "
                                            "commit (it keeps uploads only for a while unless committed); nothing was "
                                            "published", gone) from None
                raise
            commit = info.oid
        return PublishResult(url, sorted(op.path_in_repo for op in uploads if op.path_in_repo not in gone),
                             sorted(unchanged), commit, sorted(gone))

    def _gone(self, repo_id: str, objects: Mapping[str, PreuploadedFile]) -> list[str]:
        """Names of `objects` the repo's LFS storage no longer holds: those git-lfs's batch API (a stable protocol)
        asks to be uploaded again. All of them when it cannot tell."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        lfs_json = "application/vnd.git-lfs+json"
        payload = {"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                   "objects": [{"oid": f.sha256, "size": f.size} for f in objects.values()]}

        def ask() -> set[str]:
            response = get_session().post(f"{self.api.endpoint}/{repo_id}.git/info/lfs/objects/batch", json=payload,
                                          headers={"Accept": lfs_json, "Content-Type": lfs_json,
                                                   **build_hf_headers(token=self.api.token)})
            hf_raise_for_status(response)
            return {o["oid"] for o in response.json()["objects"] if o.get("actions") or o.get("error")}

        try:
            absent = self._call(f"checking the uploads to {repo_id}", ask)
        except (PublishError, KeyError, TypeError, ValueError):
            return sorted(objects)
        return sorted(name for name, f in objects.items() if f.sha256 in absent)

    def preupload(self, repo_id: str, files: dict[str, tuple[Path, str]], *,
                  private: bool) -> dict[str, PreuploadedFile | None]:
        """Send the LFS files among `files` (name -> (path, sha256)) to the repo's storage ahead of a commit (which
        needs the repo: it is created, as publish would). Name -> what a commit needs of it without the file; None
        for a file the Hub keeps as a regular git file (a commit carries its bytes). Files the repo already holds with
        that sha256 are not sent."""
        from huggingface_hub import CommitOperationAdd

        self._create(repo_id, private)
        remote = self.remote_files(repo_id)
        out: dict[str, PreuploadedFile | None] = {}
        ops = []
        for name, (path, sha256) in sorted(files.items()):
            if remote.get(name, (None, None))[0] == sha256:
                out[name] = _record(path, sha256)
            else:
                ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        if ops:
            self._call(f"uploading to {repo_id}", lambda: self.api.preupload_lfs_files(repo_id, additions=ops))
        for op in ops:
            # as documented, preupload_lfs_files swaps an uploaded LFS file's content for b""; a regular one keeps it
            out[op.path_in_repo] = _record(*files[op.path_in_repo]) if op.path_or_fileobj == b"" else None
        return out

    def read_manifest(self, repo_id: str) -> dict[str, Any] | None:
        """quantforge.json on the repo's main branch, in one GET (hf_hub_download would add a HEAD): what a nightly
        plan judges the repo by. None when the repo or the file does not exist."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(repo_id, REPO_MANIFEST, endpoint=self.api.endpoint)

        def fetch() -> dict[str, Any] | None:
            response = get_session().get(url, headers=build_hf_headers(token=self.api.token), follow_redirects=True)
            # the Hub answers 401 rather than 404 for a repo an anonymous caller cannot see, with the same code
            if response.status_code == 404 or response.headers.get("X-Error-Code") in _ABSENT:
                return None
            hf_raise_for_status(response)
            try:
                data = response.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                log.warning("%s/%s is not a JSON object; taken as no record", repo_id, REPO_MANIFEST)
                return None
            return data

        return self._call(f"reading {repo_id}/{REPO_MANIFEST}", fetch)

    def held(self, repo_id: str, hashes: Collection[str] = ()) -> dict[str, HeldFile] | None:
        """What the repo's main branch holds, in one listing request: each file's size, and an LFS file's sha256
        (the Hub keeps it; a regular file's sha256 it does not know, and nothing is downloaded to learn it, so
        `hashes` asks nothing more). None when there is no such repo."""
        from huggingface_hub.errors import RepositoryNotFoundError

        def listing() -> dict[str, HeldFile] | None:
            try:
                entries = self.api.list_repo_tree(repo_id, recursive=True)
                return {e.path: HeldFile(e.size, e.lfs.sha256 if getattr(e, "lfs", None) else None)
                        for e in entries if hasattr(e, "blob_id")}
            except RepositoryNotFoundError:
                return None

        return self._call(f"listing {repo_id}", listing)


def _record(path: Path, sha256: str) -> PreuploadedFile:
    with open(path, "rb") as f:
        sample = f.read(512)
    return PreuploadedFile(sha256, path.stat().st_size, sample)


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"HTTP {status}: {first_line}" if status else f"{type(exc).__name__}: {first_line}"
