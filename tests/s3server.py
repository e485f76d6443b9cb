"""A real S3 API server on loopback (moto in server mode) for the object store tests;
the fixtures `s3_server` and `bucket` are in tests/conftest.py."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class S3Server:
    """A moto S3 server in this process, on its own port."""

    port: int
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

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
