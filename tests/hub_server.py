"""A small Hub-compatible HTTP server on 127.0.0.1 for publishing tests, driven by the real huggingface_hub
client (HF_HUB_DISABLE_XET=1 selects the documented LFS path: preupload -> LFS batch -> PUT -> NDJSON commit).

It keeps repos in memory, records every request (method, path, Authorization header) and can inject faults:
`server.fail("PUT", "/lfs-upload/", 500, times=2)`, 429, or "drop" (close the connection without answering).
Commits are atomic: every LFS object must have arrived, or nothing changes. Each commit keeps a snapshot, so
model info, the file tree and downloads (`resolve/{rev}/{path}`, HEAD and GET, as hf_hub_download and
snapshot_download use them) answer for a branch or a commit; `seed(repo, folder)` commits a folder's files, so a
tiny model can be a Hub source.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def blob_sha1(content: bytes) -> str:
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, dict] = field(default_factory=dict)  # path -> {size, blob, lfs, content}
    commits: list[dict] = field(default_factory=list)  # {oid, summary, files, snapshot}

    def at(self, revision: str) -> tuple[str, dict[str, dict]] | None:
        """(commit oid, files) at a branch ("main") or a commit; None when there is no such revision."""
        if revision == "main":
            return (self.commits[-1]["oid"] if self.commits else "0" * 40), self.files
        found = next((c for c in self.commits if c["oid"] == revision), None)
        return (found["oid"], found["snapshot"]) if found else None


class HubServer:
    def __init__(self, accept_token: str | None = None):
        self.accept_token = accept_token  # when set, any other Authorization is refused with 401
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.faults: list[list] = []  # [method, path fragment, action, remaining]
        self.bytes_in = 0  # request bodies received (uploads, commits)
        self.bytes_out = 0  # response bodies sent (downloads, listings)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, method: str, fragment: str, action: int | str, times: int = 1) -> None:
        self.faults.append([method, fragment, action, times])

    def uploads(self) -> list[str]:
        """Paths of LFS objects PUT so far (by oid)."""
        return [p for m, p, _ in self.requests if m == "PUT"]

    def api_requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request but huggingface_hub's own once-a-day registry fetch."""
        return [(m, p) for m, p, _ in self.requests if p != "/api/agent-harnesses"]

    def seed(self, repo_id: str, folder: Path, summary: str = "seed") -> str:
        """Commit every file of `folder` to `repo_id` (created if needed), as an upload would; the commit's oid."""
        repo = self.repos.setdefault(repo_id, Repo(private=False))
        changes = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            content = path.read_bytes()
            name = path.relative_to(folder).as_posix()
            lfs = None
            if name.endswith((".safetensors", ".gguf")) or len(content) > 1_000_000:
                lfs = hashlib.sha256(content).hexdigest()
                self.lfs[lfs] = content
            changes[name] = {"size": len(content), "lfs": lfs, "content": None if lfs else content,
                             "blob": blob_sha1(f"oid sha256:{lfs}".encode()) if lfs else blob_sha1(content)}
        return _apply(repo_id, repo, changes, summary)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.bytes_in += len(body)
                return body

            def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                with server.lock:
                    server.bytes_out += len(body)

            def _fault(self) -> bool:
                path = urlparse(self.path).path
                with server.lock:
                    for fault in server.faults:
                        method, fragment, action, remaining = fault
                        if remaining > 0 and method == self.command and fragment in path:
                            fault[3] -= 1
                            break
                    else:
                        return False
                self._body()
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                else:
                    self._send(action, {"error": "injected"}, {"Retry-After": "0"})
                return True

            def _route(self):
                server.requests.append((self.command, urlparse(self.path).path, self.headers.get("Authorization")))
                if server.accept_token and self.headers.get("Authorization") != f"Bearer {server.accept_token}":
                    self._body()
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if self._fault():
                    return
                path = urlparse(self.path).path
                parts = path.strip("/").split("/")
                if self.command == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(self._body()))
                if path == "/api/agent-harnesses":  # huggingface_hub's own registry, fetched once a day
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                if self.command == "POST" and path == "/api/validate-yaml":  # README front matter check
                    self._body()
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    repo_id, action = "/".join(parts[2:4]), parts[4]
                    repo = server.repos.get(repo_id)
                    if repo is None:
                        self._body()
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if action in ("tree", "revision") and self.command == "GET":
                        found = repo.at(unquote(parts[5]) if len(parts) > 5 else "main")
                        if found is None:
                            return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                        sha, files = found
                        if action == "tree":
                            return self._send(200, [
                                {"type": "file", "path": p, "size": f["size"], "oid": f["blob"],
                                 **({"lfs": {"oid": f["lfs"], "size": f["size"], "pointerSize": 130}}
                                    if f["lfs"] else {})} for p, f in sorted(files.items())])
                        return self._send(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                                "siblings": [
                            {"rfilename": p, "size": f["size"], "blobId": f["blob"],
                             **({"lfs": {"sha256": f["lfs"], "size": f["size"], "pointerSize": 130}}
                                if f["lfs"] else {})} for p, f in sorted(files.items())]})
                    if action == "preupload":
                        return self._preupload(repo, json.loads(self._body()))
                    if action == "commit":
                        return self._commit(repo_id, repo, self._body())
                if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                    return self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])))
                if path.endswith(".git/info/lfs/objects/batch"):
                    return self._batch(json.loads(self._body()))
                if self.command == "PUT" and parts[0] == "lfs-upload":
                    content = self._body()
                    if hashlib.sha256(content).hexdigest() != parts[1]:
                        return self._send(400, {"error": "sha256 mismatch"})
                    server.lfs[parts[1]] = content
                    return self._send(200, {})
                self._body()
                return self._send(404, {"error": f"no route {self.command} {path}"})

            do_GET = do_POST = do_PUT = do_HEAD = _route

            def _resolve(self, repo_id: str, revision: str, name: str) -> None:
                """A file's bytes (GET) or its metadata (HEAD), with the headers huggingface_hub reads."""
                repo = server.repos.get(repo_id)
                if repo is None:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                found = repo.at(revision)
                if found is None:
                    return self._send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                sha, files = found
                entry = files.get(name)
                if entry is None:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                content = server.lfs[entry["lfs"]] if entry["lfs"] else entry["content"]
                etag = entry["lfs"] or entry["blob"]
                self.send_response(200)
                for key, value in {"Content-Length": str(len(content)), "ETag": f'"{etag}"', "X-Repo-Commit": sha,
                                   "Content-Type": "application/octet-stream",
                                   **({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))}
                                      if entry["lfs"] else {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(content)
                    with server.lock:
                        server.bytes_out += len(content)

            def _create(self, body: dict) -> None:
                repo_id = f"{body['organization']}/{body['name']}"
                if repo_id in server.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{server.url}/{repo_id}"})
                private = body.get("private") or body.get("visibility") == "private"
                server.repos[repo_id] = Repo(private=bool(private))
                return self._send(200, {"url": f"{server.url}/{repo_id}", "name": repo_id})

            def _preupload(self, repo: Repo, body: dict) -> None:
                files = []
                for f in body["files"]:
                    lfs = f["path"].endswith(".gguf") or f["size"] > 1_000_000
                    existing = repo.files.get(f["path"])
                    oid = (existing["lfs"] if lfs else existing["blob"]) if existing else None
                    files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                  "shouldIgnore": False, "oid": oid})
                return self._send(200, {"files": files, "commitOid": "0" * 40})

            def _batch(self, body: dict) -> None:
                objects = []
                for obj in body["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in server.lfs:
                        entry["actions"] = {"upload": {"href": f"{server.url}/lfs-upload/{obj['oid']}"}}
                    objects.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objects},
                                  {"Content-Type": "application/vnd.git-lfs+json"})

            def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                changes, deleted = {}, []
                for line in lines:
                    value = line["value"]
                    if line["key"] == "file":
                        content = base64.b64decode(value["content"])
                        changes[value["path"]] = {"size": len(content), "blob": blob_sha1(content), "lfs": None,
                                                  "content": content}
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in server.lfs:  # atomic: reject the whole commit
                            return self._send(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                        content = server.lfs[value["oid"]]
                        changes[value["path"]] = {"size": len(content), "lfs": value["oid"], "content": None,
                                                  "blob": blob_sha1(f"oid sha256:{value['oid']}".encode())}
                    elif line["key"] == "deletedFile":
                        if value["path"] not in repo.files:
                            return self._send(404, {"error": f"{value['path']} does not exist"},
                                              {"X-Error-Code": "EntryNotFound"})
                        deleted.append(value["path"])
                header = next(line["value"] for line in lines if line["key"] == "header")
                oid = _apply(repo_id, repo, changes, header["summary"], deleted)
                return self._send(200, {"commitUrl": f"{server.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                        "success": True})

        return Handler


def _apply(repo_id: str, repo: Repo, changes: dict[str, dict], summary: str, deleted: list[str] = ()) -> str:
    """Commit `changes` and the deletion of `deleted` to `repo`; the new commit's oid."""
    oid = hashlib.sha1(json.dumps([repo_id, len(repo.commits), sorted(changes), sorted(deleted)]).encode()).hexdigest()
    repo.files.update(changes)
    for name in deleted:
        repo.files.pop(name, None)
    repo.commits.append({"oid": oid, "summary": summary, "files": sorted(changes), "deleted": sorted(deleted),
                         "snapshot": dict(repo.files)})
    return oid
