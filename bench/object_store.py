"""Upload / download throughput of the object store against a loopback S3 server.

Publishes a pack of ``--mb`` MB (two safetensors-sized files of random bytes) through
``Bucket.publish`` (staging upload, multipart with parallel parts, server-side copy,
commit marker) and reads it back through ``Bucket.fetch`` (parallel byte ranges,
sha256 checked). The server is moto in server mode on loopback, so the figures bound
the client side (hashing, threads, HTTP) rather than a real network.

    python bench/object_store.py --mb 200
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    from moto.server import ThreadedMotoServer

    from app.residuals.hashing import FileHasher
    from app.store.remote import Bucket
    from app.store.s3 import S3Config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", workers=args.workers)
        cfg.client().create_bucket(Bucket="bench")
        src = tmp / "pack"
        src.mkdir()
        half = args.mb * 1024**2 // 2
        for i in (1, 2):
            (src / f"residual-0000{i}-of-00002.safetensors").write_bytes(os.urandom(half))
        bucket = Bucket(cfg, "bench", "realign")
        hasher = FileHasher(tmp / "hashes.sqlite")
        t0 = time.perf_counter()
        bucket.publish(src, "k" * 32, "residuals", hasher, 1)
        up = time.perf_counter() - t0
        done = bucket.committed("k" * 32, "residuals")
        assert done is not None
        t0 = time.perf_counter()
        bucket.fetch(done, tmp / "back")
        down = time.perf_counter() - t0
        mb = 2 * half / 1e6
        print(f"pack {mb:.0f} MB, {args.workers} parallel parts/ranges per file")
        print(f"publish (hash + staging upload + copy + marker): {up:.2f} s, {mb / up:.0f} MB/s")
        print(f"fetch (ranged download + sha256 check): {down:.2f} s, {mb / down:.0f} MB/s")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
