"""A merge split by output shard across two real `realign worker` processes that share
only Redis and the (loopback) S3 object store, each with its own node cache, as on two
machines; the target is an ``s3://`` model.

The S3 server's request log shows what crossed the network: each shard task fetched,
whole, exactly the pack files and target files its output shard reads (headers of the
rest); the staged shards were copied on the server and nobody downloaded them (the
final task reads none of the weights); the model is the single-worker merge's, byte
for byte."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from app.demo.tiny import TinyTriple
from app.jobs.models import Caller, JobRecord, JobStatus, MergeSpec
from app.jobs.service import JobService
from app.merge import merge_to_store
from app.residuals.apply_shard import shard_reads
from app.residuals.checkpoint import Checkpoint
from app.store.s3 import relative_files
from tests.jobs.conftest import RedisServer, Workers, service_env
from tests.s3server import S3Request, S3Server, object_settings, object_store

pytestmark = pytest.mark.slow
ALICE = Caller(name="alice")
MAX_SHARD_GB = "0.0005"  # the tiny model (~3 MB) then has 6+ output shards
STORE = "realign"  # the store's prefix in the bucket


def _upload(s3_server: S3Server, bucket: str, src: Path, prefix: str) -> str:
    client = s3_server.client()
    for rel in relative_files(src):
        client.upload_file(str(src / rel), bucket, f"{prefix}/{rel}")
    return f"s3://{bucket}/{prefix}"


def _wait(svc: JobService, job_id: str, timeout: float, pools: list[Workers]) -> JobRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rec = svc.get(job_id, ALICE)
        if rec.status.terminal:
            return rec
        time.sleep(0.05)
    raise AssertionError(
        f"job {job_id} not done in {timeout} s\n" + "".join(p.logs() for p in pools)
    )


def _written(svc: JobService, job_id: str) -> dict[str, tuple[str, float]]:
    """Output shard -> (worker that wrote it, MB of inputs it fetched), from the events."""
    found = (
        re.match(r"(\S+) written by (\S+) \(([\d.]+) MB of inputs fetched\)", e.message)
        for e in svc.events(job_id, ALICE)
    )
    return {m.group(1): (m.group(2), float(m.group(3))) for m in found if m}


def _whole_gets(log: list[S3Request], sizes: dict[str, int]) -> dict[str, int]:
    """How often each object of ``sizes`` was downloaded whole (a header is a short range)."""
    counts = dict.fromkeys(sizes, 0)
    for r in log:
        if r.method == "GET" and r.key in sizes and r.range == f"bytes=0-{sizes[r.key] - 1}":
            counts[r.key] += 1
    return counts


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def _same_model(got: Path, want: Path) -> None:
    """Byte for byte, but for the creation time and the directory each node cached the
    target in (recorded as provenance in realign.json and the card)."""
    a, b = _files(got), _files(want)
    assert a.keys() == b.keys()
    assert len([n for n in a if n.endswith(".safetensors")]) >= 3
    for name in set(a) - {"README.md", "realign.json"}:
        assert a[name] == b[name], name
    ma, mb = json.loads(a["realign.json"]), json.loads(b["realign.json"])
    for m in (ma, mb):
        for field in ("created_at", "manifest_sha256"):
            m.pop(field)
        m["target"].pop("path")
    assert ma == mb  # the lineage too: measured by the planning node, which holds the inputs


def test_split_merge_of_an_s3_target_on_two_nodes(
    redis_server: RedisServer,
    s3_server: S3Server,
    bucket: str,
    llama_triple: TinyTriple,
    tmp_path: Path,
) -> None:
    t = llama_triple
    target = _upload(s3_server, bucket, t.new_base, "models/new-base")
    extra = {
        "REALIGN_STORE_URL": f"s3://{bucket}/{STORE}",
        "REALIGN_S3_ENDPOINT_URL": s3_server.endpoint,
        "REALIGN_MAX_SHARD_GB": MAX_SHARD_GB,
        "REALIGN_MERGE_PARALLEL_MIN_SHARDS": "2",
        "REALIGN_MAX_READ_MBPS": "1",  # slow enough that both workers take shards
        # a step reads ~10 MB at that rate: above the suite's short time limit
        "REALIGN_JOB_TIME_LIMIT_S": "120",
        "REALIGN_VISIBILITY_TIMEOUT_S": "130",
    }
    roots = [t.base.parent]
    pools = [
        Workers(service_env(redis_server.url, tmp_path / f"node{i}", roots, **extra), tmp_path)
        for i in (1, 2)
    ]
    service = JobService.from_settings(
        object_settings(
            s3_server, bucket, tmp_path / "api-node", redis_url=redis_server.url,
            allowed_roots=roots, job_time_limit_s=8, visibility_timeout_s=10,
        )
    )  # fmt: skip
    try:
        pools[0].start("w1")
        pools[1].start("w2")
        end = time.monotonic() + 60
        while len(service.workers()) < 2 and time.monotonic() < end:
            time.sleep(0.2)
        mark = s3_server.mark()
        spec = MergeSpec(base=str(t.base), instruct=str(t.instruct), target=target)
        rec, _ = service.submit(spec, ALICE)
        done = _wait(service, rec.id, 180, pools)
        log = s3_server.requests(bucket, mark)  # before anything else reads the bucket
        assert done.status == JobStatus.succeeded, (done.error, *(p.logs() for p in pools))
        assert done.result is not None
        written = _written(service, rec.id)
        assert len({w for w, _ in written.values()}) == 2, written  # both nodes wrote shards

        # The final task copied every staged shard on the server; nobody downloaded one,
        # nor the published weights.
        shards = f"{STORE}/.shards/{rec.id}/"
        copied = {r.copy_source.rsplit("/", 1)[1] for r in log if shards in (r.copy_source or "")}
        assert copied == set(written)
        assert [r for r in log if r.method == "GET" and r.key.startswith(f"{STORE}/.shards/")] == []
        merged = f"{STORE}/merged/{done.result.merged_key}/"
        assert [r for r in log if r.method == "GET" and r.key.startswith(merged)
                and r.key.endswith(".safetensors")] == []  # fmt: skip

        # The single-worker merge of the same request, on a node of its own.
        ref_bucket = s3_server.bucket()
        ref_settings = object_settings(
            s3_server, ref_bucket, tmp_path / "ref-node", max_shard_gb=float(MAX_SHARD_GB)
        )
        ref = merge_to_store(
            base=str(t.base), instruct=str(t.instruct), target=target, settings=ref_settings
        )
        assert ref.key == done.result.merged_key
        reader = object_store(s3_server, bucket, tmp_path / "reader")
        with reader.using(ref.key, "merged") as published:
            _same_model(published, ref.path)

        # Each shard task fetched whole exactly the pack files its shard reads; the
        # target files its shard reads, too (plus the planning and validating nodes'
        # downloads of the whole target, made to pin and hash it).
        ref_store = object_store(s3_server, ref_bucket, tmp_path / "ref-node")
        with ref_store.using(ref.residual_key) as pack_dir, Checkpoint.open(t.new_base) as tgt:
            reads = [
                shard_reads(pack_dir, tgt, 1.0, i, int(float(MAX_SHARD_GB) * 1024**3))
                for i in range(len(written))
            ]
            stored = reader.bucket.committed(ref.residual_key, "residuals")
            assert stored is not None  # the pack the job published, in its builder's prefix
            pack_sizes = {
                reader.bucket.file(stored, p.name): p.stat().st_size
                for p in pack_dir.iterdir()
                if p.suffix in (".safetensors", ".frames")
            }
        target_sizes = {
            f"models/new-base/{p.name}": p.stat().st_size for p in t.new_base.glob("*.safetensors")
        }
        want_pack = {k: sum(k.rsplit("/", 1)[1] in p for p, _ in reads) for k in pack_sizes}
        assert _whole_gets(log, pack_sizes) == want_pack
        assert all(n >= 1 for n in want_pack.values())  # every pack file checked by someone
        for key, n in _whole_gets(log, target_sizes).items():
            need = sum(key.rsplit("/", 1)[1] in tg for _, tg in reads)
            assert need <= n <= need + 2, (key, n, need)
        total = sum(pack_sizes.values()) + sum(target_sizes.values())
        assert all(mb * 1e6 < total for _, mb in written.values()), (written, total)

        # A local target with an object store: other nodes cannot read it, one task.
        local = MergeSpec(
            base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), alpha=0.5
        )
        rec2, _ = service.submit(local, ALICE)
        done2 = _wait(service, rec2.id, 120, pools)
        assert done2.status == JobStatus.succeeded, (done2.error, *(p.logs() for p in pools))
        events = [e.message for e in service.events(rec2.id, ALICE)]
        assert any(m.startswith("not split: the target") for m in events), events
        assert not any(m.startswith("split into") for m in events), events
    finally:
        for pool in pools:
            pool.stop_all()
