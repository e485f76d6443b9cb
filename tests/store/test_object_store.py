"""The object store against a real S3 API server: round trip, commit marker, cache
budget, settings-only budgets, ``s3://`` model refs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.errors import ArtifactInUseError, ArtifactNotFoundError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.merge import compute, list_artifacts, merge, merge_to_store
from app.store.base import Store
from app.store.local import LocalStore
from app.store.remote import COMMIT
from tests.s3server import S3_ENV, S3Server, object_settings, object_store

ROOT = Path(__file__).resolve().parents[2]


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_stores_are_one_protocol(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    assert isinstance(LocalStore(tmp_path / "l"), Store)
    assert isinstance(object_store(s3_server, bucket, tmp_path / "c"), Store)


def test_round_trip_equals_local_store(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    local = compute(str(t.base), str(t.instruct), store=tmp_path / "local")
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    built = compute(str(t.base), str(t.instruct), store=node_a)
    assert built.created and built.key == local.key
    names = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"realign/residuals/{local.key}/{COMMIT}" in names
    assert not any("/.staging/" in n for n in names)  # staging removed after the commit
    # Another node, empty cache: downloads, checks every sha256, same bytes.
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    again = compute(str(t.base), str(t.instruct), store=node_b)
    assert not again.created
    with node_b.using(local.key) as path:
        assert _files(path) == _files(node_a.path(local.key))  # what node A published
        got, want = _files(path), _files(local.path)
        assert got.keys() == want.keys()
        assert {n: b for n, b in got.items() if n != "manifest.json"} == {
            n: b for n, b in want.items() if n != "manifest.json"
        }  # the manifest differs only in its creation time
    assert node_b.verify(local.key).key == local.key
    assert [a.key for a in node_b.artifacts()] == [local.key]
    assert node_b.usage() == sum(len(b) for b in _files(node_a.path(local.key)).values())


def test_reader_sees_only_committed(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    st = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(llama_triple.base), str(llama_triple.instruct), store=st).key
    s3_server.client().delete_object(Bucket=bucket, Key=f"realign/residuals/{key}/{COMMIT}")
    fresh = object_store(s3_server, bucket, tmp_path / "b")
    assert not fresh.exists(key) and fresh.artifacts() == []
    with pytest.raises(ArtifactNotFoundError), fresh.using(key):
        pass


def test_budget_from_settings_only_is_enforced_by_jobs(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    """A budget given only on a ``Settings`` object (no environment) reaches the store
    the job path uses: the older merged model is evicted."""
    assert "REALIGN_STORE_BUDGET_GB" not in os.environ
    from app.jobs.models import Caller, MergeSpec
    from app.jobs.service import JobService
    from tests.jobs.test_embedded import wait

    t = llama_triple
    settings = Settings(
        models_cache_dir=store_dir, allowed_roots=[t.base.parent], store_budget_gb=1e-9
    )
    svc = JobService.from_settings(settings)
    svc.start()
    try:
        keys = []
        for alpha in (0.5, 0.75):
            spec = MergeSpec(
                base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), alpha=alpha
            )
            rec, _ = svc.submit(spec, Caller(name="alice"))
            done = wait(svc, rec.id)
            assert done.result is not None, done.error
            keys.append(done.result.merged_key)
    finally:
        svc.stop()
    left = {a.key for a in list_artifacts(store_dir, settings)}
    assert keys[1] in left and keys[0] not in left


def test_cache_budget_evicts_but_bucket_keeps(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    st = object_store(s3_server, bucket, tmp_path / "c", store_cache_budget_gb=1e-9)
    first = compute(str(t.base), str(t.instruct), store=st, dtype="float32")
    second = compute(str(t.base), str(t.instruct), store=st)
    cached = {a.key for a in st.cache.artifacts()}
    assert second.key in cached and first.key not in cached
    assert {a.key for a in st.artifacts()} == {first.key, second.key}
    with st.using(first.key) as path:  # read through again
        assert (path / "manifest.json").is_file()


def test_merge_to_object_store_twice_reuses(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    settings = object_settings(s3_server, bucket, tmp_path / "a")
    one = merge_to_store(
        base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), settings=settings
    )
    other = object_settings(s3_server, bucket, tmp_path / "b")
    two = merge_to_store(
        base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), settings=other
    )
    assert one.created and not two.created and one.key == two.key
    assert _files(one.path) == _files(two.path)


def test_a_second_node_applies_the_stored_residual(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Another alpha on another node (an empty cache): the residual is fetched from the
    bucket and reused, not computed again."""
    t = llama_triple
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    one = merge_to_store(**req, settings=object_settings(s3_server, bucket, tmp_path / "a"))
    two = merge_to_store(
        **req, alpha=0.5, settings=object_settings(s3_server, bucket, tmp_path / "b")
    )
    assert one.residual_created and not two.residual_created
    assert two.created and two.residual_key == one.residual_key and two.key != one.key


def _upload(s3_server: S3Server, bucket: str, src: Path, prefix: str) -> str:
    client = s3_server.client()
    for p in src.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(src).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def test_s3_model_refs_in_realign_merge(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    t = llama_triple
    refs = [
        _upload(s3_server, bucket, p, f"models/{p.name}") for p in (t.base, t.instruct, t.new_base)
    ]
    env = {
        **os.environ,
        **S3_ENV,
        "REALIGN_S3_ENDPOINT_URL": s3_server.endpoint,
        "REALIGN_MODELS_CACHE_DIR": str(tmp_path / "store"),
        "PYTHONPATH": str(ROOT),
    }
    out = tmp_path / "merged"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "merge",
            "-b",
            refs[0],
            "-i",
            refs[1],
            "-t",
            refs[2],
            "-o",
            str(out),
            "-q",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    local = merge(
        str(t.base),
        str(t.instruct),
        str(t.new_base),
        tmp_path / "local",
        store=tmp_path / "local-store",
    )
    weights = {n: b for n, b in _files(out).items() if n.endswith(".safetensors")}
    assert weights and weights == {
        n: b for n, b in _files(local.out).items() if n.endswith(".safetensors")
    }
    manifest = (out / "realign.json").read_text()
    assert f"{refs[0]}@sha256:" in manifest  # the pinned identity is recorded


def test_publish_a_finished_directory(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    made = compute(str(llama_triple.base), str(llama_triple.instruct), store=tmp_path / "made")
    for st in (LocalStore(tmp_path / "local"), object_store(s3_server, bucket, tmp_path / "c")):
        assert st.publish(made.path, made.key)
        assert not st.publish(made.path, made.key)  # already there: the first one stays
        assert st.verify(made.key).key == made.key
    reader = object_store(s3_server, bucket, tmp_path / "reader")
    with reader.using(made.key) as path:
        assert _files(path) == _files(made.path)


def test_a_download_in_progress_pins_the_bucket_copy(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A reader on this node holds an artifact it is still downloading (not cached yet):
    the bucket's budget evicts other artifacts, not that one, and removal is refused."""
    made = compute(str(llama_triple.base), str(llama_triple.instruct), store=tmp_path / "made")
    st = object_store(s3_server, bucket, tmp_path / "node")
    assert st.publish(made.path, made.key)
    st.cache.remove(made.key)  # not in this node's cache: a reader starts downloading it
    evictor = object_store(s3_server, bucket, tmp_path / "node", store_budget_gb=1e-9)
    evictor.lease_s = 0  # nothing counts as just committed
    with st.cache.pinned(made.key):
        assert [a.in_use for a in evictor.artifacts()] == [True]
        assert evictor.evict() == [] and evictor.exists(made.key)
        with pytest.raises(ArtifactInUseError):
            evictor.remove(made.key)
    assert evictor.evict() == [made.key] and not evictor.exists(made.key)


def test_a_ranged_download_reads_one_version_of_an_object(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Every range of an ``s3://`` input is read under the ETag it was listed with: an
    object replaced in between (a checkpoint pushed again) fails the download instead
    of leaving a file made of both versions."""
    from app.store.s3 import ObjectChangedError, download_file

    st = object_store(s3_server, bucket, tmp_path / "node")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="models/x/model.safetensors", Body=b"a" * 5000)
    listed = client.head_object(Bucket=bucket, Key="models/x/model.safetensors")["ETag"]
    dest = tmp_path / "x" / "model.safetensors"
    download_file(st.s3, bucket, "models/x/model.safetensors", dest, 5000, None, listed)
    assert dest.read_bytes() == b"a" * 5000
    client.put_object(Bucket=bucket, Key="models/x/model.safetensors", Body=b"b" * 5000)
    with pytest.raises(ObjectChangedError, match="replaced while it was being read"):
        download_file(st.s3, bucket, "models/x/model.safetensors", dest, 5000, None, listed)


def test_downloads_left_by_killed_processes_are_swept(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A process killed while it downloaded an ``s3://`` input left its ``.part``
    directory: the next resolve removes it once nothing wrote to it for hours; a
    download under way (written to recently) stays."""
    from app.store.inputs import PART_TTL_S, resolve_input

    st = object_store(s3_server, bucket, tmp_path / "node")
    ref = _upload(s3_server, bucket, llama_triple.base, "models/base")
    parts = st.root / "sources" / "s3"
    dead, live = parts / "0123.deadbeef.part", parts / "4567.cafef00d.part"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 100)
    old = time.time() - PART_TTL_S - 60
    for p in (dead, dead / "model.safetensors"):
        os.utime(p, (old, old))
    got = resolve_input(ref, st)
    assert got.path.is_dir() and not dead.exists() and live.is_dir()
