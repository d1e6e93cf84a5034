"""A small Hub-compatible HTTP server for tests: real `huggingface_hub` client, no internet.

Serves the endpoints the client uses to download (repo info, recursive tree, resolve with
X-Repo-Commit/ETag headers, HF error codes) and to publish (create repo, create branch,
preupload answering "regular" for every file, NDJSON commit). LFS/Xet uploads are not
implemented: the server never asks for them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def _sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool = False) -> None:
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def commit(self, files: dict[str, bytes], branch: str = "main", parent: str | None = None) -> str:
        base = dict(self.commits[self.refs[branch]]) if branch in self.refs else (
            dict(self.commits[parent]) if parent else {})
        base.update(files)
        sha = hashlib.sha1(json.dumps(sorted((k, _sha(v)) for k, v in base.items())).encode()
                           + str(time.time_ns()).encode()).hexdigest()
        self.commits[sha] = base
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.connections: set[socket.socket] = set()

    # ---------------------------------------------------------------- control
    def start(self, port: int = 0) -> None:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening and cut kept-alive connections too, so the client really sees no network."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.connections.clear()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo())
        return repo.commit(files, branch=branch)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        self.fake.connections.add(self.connection)

    def finish(self) -> None:
        self.fake.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # ---------------------------------------------------------------- helpers
    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data: object, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(data).encode(), headers)

    def _error(self, code: int, error_code: str, message: str) -> None:
        self._json(code, {"error": message}, {"X-Error-Code": error_code, "X-Error-Message": message})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    # ---------------------------------------------------------------- GET / HEAD
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.fake.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            return self._revision_info("/".join(parts[2:4]), "/".join(parts[5:]))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree("/".join(parts[2:4]), parts[5], "/".join(parts[6:]), parse_qs(url.query))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._error(404, "EntryNotFound", f"no route for {path}")

    def _revision_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": f} for f in sorted(files)], "tags": []})

    def _tree(self, repo_id: str, rev: str, sub: str, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{sub}/" if sub else ""
        entries, dirs = [], set()
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            for i in range(1, rest.count("/") + 1):
                dirs.add(prefix + "/".join(rest.split("/")[:i]))
            entries.append({"type": "file", "path": name, "size": len(data), "oid": _sha(data)})
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        self._json(200, entries)

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        data = repo.commits[sha].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist at {rev}")
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_sha(data)}"', "Accept-Ranges": "bytes"},
                   ctype="application/octet-stream")

    # ---------------------------------------------------------------- POST
    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.fake.requests.append(("POST", path))
        body = self._body()
        parts = path.strip("/").split("/")
        if parts == ["api", "repos", "create"]:
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo_id in self.fake.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{self.fake.endpoint}/{repo_id}"})
            repo = Repo(private=bool(data.get("private")) or data.get("visibility") == "private")
            repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self.fake.repos[repo_id] = repo
            return self._json(200, {"url": f"{self.fake.endpoint}/{repo_id}", "name": repo_id})
        if parts == ["api", "validate-yaml"]:
            # the client checks README front matter before committing it
            content = json.loads(body).get("content", "")
            try:
                front = content.split("---")[1] if content.startswith("---") else ""
                yaml.safe_load(front)
            except (IndexError, yaml.YAMLError) as exc:
                return self._json(400, {"error": f"invalid YAML front matter: {exc}"})
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            repo = self._repo(repo_id)
            if repo is None:
                return
            if action == "branch":
                if rev in repo.refs:
                    return self._error(409, "BranchExists", f"branch {rev} already exists")
                repo.refs[rev] = repo.refs["main"]
                return self._json(200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if action == "commit":
                if repo.resolve(rev) is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files: dict[str, bytes] = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] in ("lfsFile", "deletedFile", "deletedFolder", "copyFile"):
                        return self._error(400, "BadRequest", f"{item['key']} not supported by the test hub")
                sha = repo.commit(files, branch=rev)
                return self._json(200, {"success": True, "commitOid": sha,
                                        "commitUrl": f"{self.fake.endpoint}/{repo_id}/commit/{sha}"})
        self._error(404, "EntryNotFound", f"no route for POST {path}")
