"""A small Hub-compatible HTTP server on 127.0.0.1 for publishing tests, driven by the real huggingface_hub
client (HF_HUB_DISABLE_XET=1 selects the documented LFS path: preupload -> LFS batch -> PUT -> NDJSON commit).

It keeps repos in memory, records every request (method, path, Authorization header) and can inject faults:
`server.fail("PUT", "/lfs-upload/", 500, times=2)`, 429, or "drop" (close the connection without answering).
Commits are atomic: every LFS object must have arrived, or nothing changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


def blob_sha1(content: bytes) -> str:
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, dict] = field(default_factory=dict)  # path -> {size, blob, lfs}
    commits: list[dict] = field(default_factory=list)


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.faults: list[list] = []  # [method, path fragment, action, remaining]
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

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

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
                if self._fault():
                    return
                path = urlparse(self.path).path
                parts = path.strip("/").split("/")
                if self.command == "POST" and path == "/api/repos/create":
                    return self._create(json.loads(self._body()))
                if self.command == "POST" and path == "/api/validate-yaml":  # README front matter check
                    self._body()
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    repo_id, action = "/".join(parts[2:4]), parts[4]
                    repo = server.repos.get(repo_id)
                    if repo is None:
                        self._body()
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if action == "tree" and self.command == "GET":
                        return self._send(200, [{"type": "file", "path": p, "size": f["size"], "oid": f["blob"],
                                                 **({"lfs": {"oid": f["lfs"], "size": f["size"],
                                                             "pointerSize": 130}} if f["lfs"] else {})}
                                                for p, f in sorted(repo.files.items())])
                    if action == "revision" and self.command == "GET":
                        sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
                        return self._send(200, {"id": repo_id, "sha": sha, "private": repo.private,
                                                "siblings": [{"rfilename": p} for p in repo.files]})
                    if action == "preupload":
                        return self._preupload(repo, json.loads(self._body()))
                    if action == "commit":
                        return self._commit(repo_id, repo, self._body())
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
                changes = {}
                for line in lines:
                    value = line["value"]
                    if line["key"] == "file":
                        content = base64.b64decode(value["content"])
                        changes[value["path"]] = {"size": len(content), "blob": blob_sha1(content), "lfs": None}
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in server.lfs:  # atomic: reject the whole commit
                            return self._send(400, {"error": f"LFS object {value['oid']} was not uploaded"})
                        content = server.lfs[value["oid"]]
                        changes[value["path"]] = {"size": len(content), "lfs": value["oid"],
                                                  "blob": blob_sha1(f"oid sha256:{value['oid']}".encode())}
                header = next(line["value"] for line in lines if line["key"] == "header")
                oid = hashlib.sha1(json.dumps([repo_id, len(repo.commits), sorted(changes)]).encode()).hexdigest()
                repo.files.update(changes)
                repo.commits.append({"oid": oid, "summary": header["summary"], "files": sorted(changes)})
                return self._send(200, {"commitUrl": f"{server.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                        "success": True})

        return Handler
