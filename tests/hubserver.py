"""A Hub-compatible file server on loopback for the tests of Hub refs (``hf:org/name@rev``).

It serves real model directories as repositories at one commit, over the HTTP API the
Hub client (``huggingface_hub``) speaks: the model info with file sizes, the file tree,
and ``resolve/`` with HEAD metadata (commit, ETag, size) and byte ranges, as the Hub
and its mirrors do. Every request is logged with the bytes it returned, as an access
log would, so a test can tell a ranged header read from a weight download. The client
is pointed at it the way ``HF_ENDPOINT`` points it at a mirror (fixture ``hub_server``
in ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class HubRequest:
    """One request the server answered."""

    method: str
    repo: str
    file: str  # "" for API calls; the path of a request it does not serve
    range: str | None
    sent: int  # body bytes returned


@dataclass
class HubServer:
    """Serves model directories (:meth:`add`) on its own port; logs what it answers."""

    httpd: ThreadingHTTPServer
    repos: dict[str, Path] = field(default_factory=dict)
    log: list[HubRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, model: Path, name: str) -> str:
        """Serve ``model`` as a new repository ``org/<name>-<id>``; its pinned ref."""
        repo = f"org/{name}-{uuid.uuid4().hex[:8]}"  # the client caches listings by repo
        self.repos[repo] = model
        return f"hf:{repo}@{COMMIT}"

    def requests(self, ref: str | None = None) -> list[HubRequest]:
        """What was answered (about the repository of ``ref``, when given)."""
        repo = None if ref is None else ref[3:].partition("@")[0]
        with self._lock:
            return [r for r in self.log if repo is None or r.repo == repo]

    def weight_bytes(self, ref: str | None = None) -> int:
        """Body bytes of ``*.safetensors`` files sent (ranged header reads included)."""
        return sum(r.sent for r in self.requests(ref) if r.file.endswith(".safetensors"))

    def downloads(self, ref: str | None = None) -> list[str]:
        """Weight files sent whole (a GET without a range)."""
        return [
            r.file
            for r in self.requests(ref)
            if r.method == "GET" and r.file.endswith(".safetensors") and r.range is None
        ]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_hub_server() -> HubServer:
    server = HubServer(ThreadingHTTPServer(("127.0.0.1", 0), _Handler))
    server.httpd.hub = server  # type: ignore[attr-defined]
    threading.Thread(target=server.httpd.serve_forever, name="hub-server", daemon=True).start()
    return server


def _files(model: Path) -> dict[str, Path]:
    return {p.relative_to(model).as_posix(): p for p in sorted(model.rglob("*")) if p.is_file()}


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log is HubServer.log

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        for pattern, answer in ((_INFO, self._info), (_TREE, self._tree)):
            if found := pattern.match(path):
                return answer(found.group(1), head)
        if found := _RESOLVE.match(path):
            return self._resolve(found.group(1), found.group(2), found.group(3), head)
        self._reply(404, b"{}", "", path, head)

    def _model(self, repo: str) -> Path | None:
        return self.hub.repos.get(repo)

    def _info(self, repo: str, head: bool) -> None:
        model = self._model(repo)
        if model is None:
            return self._reply(404, b'{"error": "Repository not found"}', repo, "", head)
        siblings = [{"rfilename": n, "size": p.stat().st_size} for n, p in _files(model).items()]
        body = {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}
        self._reply(200, json.dumps(body).encode(), repo, "", head)

    def _tree(self, repo: str, head: bool) -> None:
        model = self._model(repo)
        if model is None:
            return self._reply(404, b'{"error": "Repository not found"}', repo, "", head)
        entries = [
            {"type": "file", "path": n, "size": p.stat().st_size, "oid": _etag(p)[:40]}
            for n, p in _files(model).items()
        ]
        self._reply(200, json.dumps(entries).encode(), repo, "", head)

    def _resolve(self, repo: str, rev: str, name: str, head: bool) -> None:
        model = self._model(repo)
        file = None if model is None else _files(model).get(name)
        if file is None or rev not in (COMMIT, "main"):
            return self._reply(404, b"{}", repo, name, head, {"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        extra = {"X-Repo-Commit": COMMIT, "ETag": f'"{_etag(file)}"', "Accept-Ranges": "bytes"}
        asked = self.headers.get("Range")
        span = _RANGE.match(asked or "")
        if span is None:
            return self._reply(200, data, repo, name, head, extra, asked)
        start = int(span.group(1))
        end = min(int(span.group(2)) if span.group(2) else len(data) - 1, len(data) - 1)
        extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._reply(206, data[start : end + 1], repo, name, head, extra, asked)

    def _reply(
        self,
        status: int,
        body: bytes,
        repo: str,
        name: str,
        head: bool,
        extra: dict[str, str] | None = None,
        asked: str | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/json" if not name else "application/octet-stream"
        )
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        with self.hub._lock:
            self.hub.log.append(
                HubRequest(self.command, repo, name, asked, 0 if head else len(body))
            )
