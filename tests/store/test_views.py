"""What a task of a split merge fetches from the object store (a real S3 API server):
headers of everything, whole and checked the files its output shard reads, and the
server-side copy the final task publishes with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.core.errors import ArtifactCorruptError, ModelNotFoundError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.jobs.shard_inputs import open_inputs
from app.jobs.shard_records import SplitPlan
from app.merge import compute
from app.residuals.apply import apply_residual, open_pack, plan_apply
from app.residuals.apply_shard import apply_shard, plan_apply_shards
from app.residuals.checkpoint import Checkpoint
from app.residuals.plan import layout_digest
from app.residuals.sources import RunOptions, describe_source
from app.store.inputs import resolve_input
from app.store.local import LocalStore
from app.store.objects import ObjectStore
from app.store.s3 import S3Config, copy_object, relative_files
from app.store.views import model_view, pack_view
from tests.s3server import S3Server, object_settings, object_store

MAX_SHARD = int(0.0005 * 1024**3)


def _upload(s3_server: S3Server, bucket: str, src: Path, prefix: str) -> str:
    for rel in relative_files(src):
        s3_server.client().upload_file(str(src / rel), bucket, f"{prefix}/{rel}")
    return f"s3://{bucket}/{prefix}"


def _plan(st: ObjectStore, res_key: str, target: str, alpha: float) -> SplitPlan:
    """The plan the merge task would make (app.jobs.split_plan), built here directly."""
    tgt = resolve_input(target, st)
    with st.using(res_key) as pack_dir, Checkpoint.open(tgt.path) as t:
        _, shards = plan_apply_shards(pack_dir, t, alpha, MAX_SHARD)
        manifest, pack = open_pack(pack_dir)
        with pack:
            specs = [j.spec for j in plan_apply(manifest, pack, t, alpha)]
    return SplitPlan(
        residual_key=res_key, target=tgt.ref, target_src=describe_source(tgt, st.hasher),
        alpha=alpha, merged_key="m" * 32, max_shard_bytes=MAX_SHARD,
        layout=layout_digest(specs, MAX_SHARD), files=[s.file for s in shards],
        nbytes=[s.nbytes for s in shards], tensors=[len(s.tensors) for s in shards],
    )  # fmt: skip


@pytest.fixture
def cluster(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> tuple[SplitPlan, ObjectStore]:
    """A pack published by one node, the target in the bucket, and a second node (an
    empty cache) to run shard tasks on."""
    t = llama_triple
    planner = object_settings(s3_server, bucket, tmp_path / "planner", max_shard_gb=0.0005)
    res = compute(str(t.base), str(t.instruct), settings=planner)
    target = _upload(s3_server, bucket, t.new_base, "models/new-base")
    plan = _plan(object_store(s3_server, bucket, tmp_path / "planner"), res.key, target, 0.7)
    return plan, object_store(s3_server, bucket, tmp_path / "worker")


def test_shard_tasks_on_a_bare_node_write_the_one_writer_files(
    cluster: tuple[SplitPlan, ObjectStore], llama_triple: TinyTriple, tmp_path: Path
) -> None:
    plan, st = cluster
    one = tmp_path / "one"
    one.mkdir()
    planner = LocalStore(tmp_path / "planner")  # the planning node's cache
    with planner.using(plan.residual_key) as pack_dir, Checkpoint.open(llama_triple.new_base) as t:
        opts = RunOptions(max_shard_bytes=MAX_SHARD)
        apply_residual(pack_dir, t, one, target_src=plan.target_src, alpha=0.7, opts=opts)
        pack_bytes = sum(p.stat().st_size for p in pack_dir.glob("*.frames"))
    settings = Settings(models_cache_dir=st.root)
    for i, name in enumerate(plan.files):
        scratch = tmp_path / f"task{i}"
        with open_inputs(plan, st, settings, scratch, i) as inputs:
            out = scratch / "out"
            out.mkdir()
            opts = RunOptions(max_shard_bytes=MAX_SHARD, hash_outputs=True)
            got = apply_shard(
                inputs.pack_dir, inputs.target, out, alpha=0.7, index=i, opts=opts,
                layout=plan.layout, pack_checked=inputs.pack_checked,
            )  # fmt: skip
            assert inputs.pack_checked and inputs.fetched > 0
            # sparse: the pack files this shard does not read take (almost) no disk
            files = inputs.pack_dir.glob("*.frames")
            on_disk = sum(p.stat().st_blocks * 512 for p in files)
            assert on_disk < pack_bytes
        assert (out / name).read_bytes() == (one / name).read_bytes()
        assert got.file == name
    assert not st.cache.exists(plan.residual_key)  # this node never held the whole pack


def test_the_final_task_reads_headers_only(
    cluster: tuple[SplitPlan, ObjectStore], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    plan, st = cluster
    mark = s3_server.mark()
    with open_inputs(plan, st, Settings(models_cache_dir=st.root), tmp_path / "final", None) as i:
        assert i.target.tensors  # planned from headers
    got = [r for r in s3_server.requests(bucket, mark) if r.key.endswith(".safetensors")]
    assert got and all(r.method == "GET" and r.range == "bytes=0-65535" for r in got)


def test_a_damaged_pack_file_fails_the_shard_that_fetches_it(
    cluster: tuple[SplitPlan, ObjectStore], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    plan, st = cluster
    done = st.bucket.committed(plan.residual_key, "residuals")
    assert done is not None
    name = sorted(n for n in done.files if n.endswith(".frames"))[-1]
    key = st.bucket.file(done, name)
    client = s3_server.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # the last frame's bytes: the index still plans
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    view = pack_view(st.bucket, plan.residual_key, tmp_path / "v")
    with pytest.raises(ArtifactCorruptError, match="does not match its recorded sha256"):
        view.fill([name])


def test_a_layout_other_than_the_plan_is_refused(
    cluster: tuple[SplitPlan, ObjectStore], tmp_path: Path
) -> None:
    plan, st = cluster
    with open_inputs(plan, st, Settings(models_cache_dir=st.root), tmp_path / "t", 0) as inputs:
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(ArtifactCorruptError, match="plan other output files"):
            apply_shard(
                inputs.pack_dir, inputs.target, out, alpha=0.7, index=0, layout="0" * 64,
                opts=RunOptions(max_shard_bytes=MAX_SHARD), pack_checked=True,
            )  # fmt: skip


def test_a_target_view_needs_the_pinned_content(
    cluster: tuple[SplitPlan, ObjectStore], tmp_path: Path
) -> None:
    plan, st = cluster
    unpinned = plan.target.split("@")[0]
    with pytest.raises(ModelNotFoundError, match="pinned"):
        model_view(st.s3, unpinned, plan.target_src, tmp_path / "t")
    other = plan.target.split("@")[0] + "@sha256:" + "0" * 64
    with pytest.raises(ModelNotFoundError, match="pinned"):
        model_view(st.s3, other, plan.target_src, tmp_path / "t")


@pytest.mark.parametrize("max_single", [None, 0])
def test_copy_on_the_server(
    s3_server: S3Server, bucket: str, max_single: int | None, tmp_path: Path
) -> None:
    """One CopyObject, or UploadPartCopy parts (as above 5 GB): the same bytes, none of
    them read by the copier."""
    cfg = S3Config(endpoint_url=s3_server.endpoint, part_bytes=5 * 1024**2)
    data = os.urandom(11 * 1024**2)  # three parts of 5 MiB at most
    s3_server.client().put_object(Bucket=bucket, Key="src/obj", Body=data)
    mark = s3_server.mark()
    kw = {} if max_single is None else {"max_single": max_single}
    copy_object(cfg, bucket, "src/obj", "dst/obj", len(data), **kw)
    log = s3_server.requests(bucket, mark)
    assert [r for r in log if r.method == "GET"] == []
    copies = [r for r in log if r.copy_source == f"{bucket}/src/obj"]
    assert len(copies) == (1 if max_single is None else 3)
    got = s3_server.client().get_object(Bucket=bucket, Key="dst/obj")["Body"].read()
    assert got == data
