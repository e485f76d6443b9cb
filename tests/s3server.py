"""A real S3 API server on loopback (moto in server mode) for the object store tests;
the fixtures `s3_server` and `bucket` are in tests/conftest.py."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from app.core.settings import Settings
from app.store.factory import store_from_settings
from app.store.locks import BuildLock
from app.store.objects import ObjectStore

# The standard AWS credential chain reads these; the test server accepts any.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "realign-test",
    "AWS_SECRET_ACCESS_KEY": "realign-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class S3Request:
    """One request the server answered: what a client asked of which object."""

    method: str
    bucket: str
    key: str
    range: str | None  # the Range header of a GET
    copy_source: str | None  # "bucket/key" of a server-side copy (CopyObject, UploadPartCopy)


@dataclass
class S3Server:
    """A moto S3 server in this process, on its own port, keeping a log of the requests
    it answers (:meth:`requests`), as an object store's access log would."""

    port: int
    server: Any = None
    log: list[S3Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wsgi = self.server._server  # the werkzeug server: log every request it serves
        wsgi.app = self._logged(wsgi.app)

    def _logged(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def logged(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            bucket, _, key = unquote(environ.get("PATH_INFO", "")).lstrip("/").partition("/")
            copy = environ.get("HTTP_X_AMZ_COPY_SOURCE")
            entry = S3Request(
                environ.get("REQUEST_METHOD", ""), bucket, key, environ.get("HTTP_RANGE"),
                unquote(copy).lstrip("/") if copy else None,
            )  # fmt: skip
            with self._lock:
                self.log.append(entry)
            return app(environ, start_response)

        return logged

    def mark(self) -> int:
        """A position in the request log, to read what came after it."""
        with self._lock:
            return len(self.log)

    def requests(self, bucket: str, since: int = 0) -> list[S3Request]:
        """The requests about ``bucket`` answered since ``since`` (see :meth:`mark`)."""
        with self._lock:
            return [r for r in self.log[since:] if r.bucket == bucket]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        name = f"realign-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_s3_server() -> S3Server:
    """A started server on a free port (credentials for it set in the environment)."""
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    server = S3Server(free_port())
    server.start()
    return server


def object_settings(s3_server: S3Server, bucket: str, cache: Path, **extra: Any) -> Settings:
    """Settings of a node whose store is ``s3://<bucket>/realign`` cached in ``cache``."""
    return Settings(
        models_cache_dir=cache,
        store_url=f"s3://{bucket}/realign",
        s3_endpoint_url=s3_server.endpoint,
        **extra,
    )


def object_store(
    s3_server: S3Server, bucket: str, cache: Path, lock: BuildLock | None = None, **extra: Any
) -> ObjectStore:
    st = store_from_settings(object_settings(s3_server, bucket, cache, **extra), lock=lock)
    assert isinstance(st, ObjectStore)
    return st
