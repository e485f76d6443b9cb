"""Fencing in the object store, with real processes, a real Redis and a real S3 server:
two builders of one key publish one artifact, a builder paused past its lease cannot
overwrite the entry of the one that took over, a failed commit shows nothing in the
node cache, and removal while another node reads."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ArtifactNotFoundError, StoreUnavailableError
from app.demo.tiny import TinyTriple
from app.jobs.locks import RedisBuildLock
from app.merge import compute
from app.store.local import LocalStore
from app.store.remote import BUILD, COMMIT
from tests.faults.test_object_store_faults import _settings_code, _spawn
from tests.helpers import start_together
from tests.jobs.conftest import RedisServer
from tests.s3server import S3Server, object_store, start_s3_server

KEY = "0123abcd" * 4


def _objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes."""
    client = s3.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing
    }


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _fill(tmp: Path, tag: str) -> Path:
    """Three small files in ``tmp``: an artifact to publish."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (tmp / f"part-{i}.bin").write_bytes(f"{tag} {i} ".encode() * 1000)
    return tmp


def _lines(proc: Any, until: str) -> list[str]:
    seen = []
    for line in proc.stdout:  # warnings may come first
        seen.append(line)
        if until in line:
            break
    return seen


def test_two_builder_processes_without_a_lock_publish_one_artifact(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """No Redis: both nodes build; the conditional commit lets one publish, the other
    discards its own upload and uses the winner's bytes."""
    t, go = llama_triple, tmp_path / "go"
    procs = []
    for node in ("a", "b"):
        script = _settings_code(s3_server, bucket, tmp_path / node) + textwrap.dedent(f"""
            import time
            from pathlib import Path
            import app.store.commit as c
            from app.merge import compute
            real = c.commit
            def commit(*args, **kw):
                won = real(*args, **kw)
                print("commit", won, flush=True)
                return won
            c.commit = commit
            print("ready", flush=True)
            while not Path({str(go)!r}).exists():
                time.sleep(0.01)
            res = compute({str(t.base)!r}, {str(t.instruct)!r}, settings=settings,
                          progress=lambda p: time.sleep(0.05))
            print("result", res.key, res.created, flush=True)
        """)
        procs.append(_spawn(script))
    start_together(procs, go)
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    commits = sorted(line for o, _ in outs for line in o.splitlines() if line.startswith("commit"))
    assert commits == ["commit False", "commit True"]  # both built, one published
    results = [o.strip().splitlines()[-1].split() for o, _ in outs]
    key = results[0][1]
    assert results[1][1] == key and sorted(r[2] for r in results) == ["False", "True"]
    stored = _objects(s3_server, bucket, f"realign/residuals/{key}/")
    assert sum(n.endswith(COMMIT) for n in stored) == 1
    assert len({n.split(BUILD)[1].split("/")[0] for n in stored if BUILD in n}) == 1
    # The loser's node holds the winner's bytes, the ones the marker names.
    assert _files(tmp_path / "a" / "residuals" / key) == _files(tmp_path / "b" / "residuals" / key)
    reader = object_store(s3_server, bucket, tmp_path / "reader")
    assert reader.verify(key).key == key


def test_builder_paused_past_its_lease_cannot_overwrite(
    llama_triple: TinyTriple,
    s3_server: S3Server,
    bucket: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A builder SIGSTOPped mid-upload loses its lease; another builder takes over and
    publishes; once continued, the first one's commit is refused, the published entry
    is unchanged byte for byte, its own upload is deleted, and its retry reuses the
    entry."""
    t, gate = llama_triple, tmp_path / "gate"
    extra = {"redis_url": redis_server.url, "store_lease_s": 1.5}
    script = _settings_code(s3_server, bucket, tmp_path / "a", **extra) + textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import app.store.commit as c
        from app.jobs.locks import cluster_store
        from app.merge import compute
        real = c.upload_file
        def upload(*args, **kw):
            real(*args, **kw)
            if not Path({str(gate)!r}).exists():
                sys.stdout.write("uploaded\\n")
                sys.stdout.flush()
            while not Path({str(gate)!r}).exists():
                time.sleep(0.01)
        c.upload_file = upload
        res = compute({str(t.base)!r}, {str(t.instruct)!r}, settings=settings,
                      store=cluster_store(settings))
        print("result", res.key, res.created, flush=True)
    """)
    paused = _spawn(script)
    assert paused.stdout is not None and paused.stderr is not None
    try:
        seen = _lines(paused, "uploaded")
        paused.send_signal(signal.SIGSTOP)  # a GC pause, a stalled VM: no renewals
        assert seen and "uploaded" in seen[-1], "".join(seen)
        node_b = object_store(
            s3_server, bucket, tmp_path / "b", lock=RedisBuildLock(redis_server.url),
            store_lease_s=1.5,
        )  # fmt: skip
        started = time.monotonic()
        res = compute(str(t.base), str(t.instruct), store=node_b)
        assert res.created and time.monotonic() - started > 0.5  # waited out the lease
        done = node_b.bucket.committed(res.key, "residuals")
        assert done is not None
        published = _objects(s3_server, bucket, f"realign/residuals/{res.key}/{done.data}/")
        published.update(_objects(s3_server, bucket, f"realign/residuals/{res.key}/{COMMIT}"))
        before = _objects(s3_server, bucket, f"realign/residuals/{res.key}/")
        assert before.keys() > published.keys()  # the paused builder's partial upload
    finally:
        gate.touch()
        paused.send_signal(signal.SIGCONT)
    out, err = paused.communicate(timeout=120)
    assert paused.returncode == 0, err
    assert "was lost before the commit" in err and "trying again" in err
    assert out.strip().splitlines()[-1].split() == ["result", res.key, "False"]
    # Byte for byte what the builder that took over published; nothing of the other.
    assert _objects(s3_server, bucket, f"realign/residuals/{res.key}/") == published
    assert _files(tmp_path / "a" / "residuals" / res.key) == _files(node_b.path(res.key))


def test_failed_commit_leaves_nothing_in_the_node_cache(tmp_path: Path) -> None:
    """The bucket goes away between the build and its commit: readers on the builder's
    node see nothing (not in the cache, not in its staging)."""
    server = start_s3_server()  # its own: this test stops it
    st = object_store(server, server.bucket(), tmp_path / "cache")
    built = []

    def build(tmp: Path) -> None:
        _fill(tmp, "x")
        built.append(tmp)
        server.stop()  # the object store is unreachable from here on

    try:
        with pytest.raises(StoreUnavailableError):
            st.get_or_build(KEY, build)
    finally:
        server.stop()
    assert built
    neighbour = LocalStore(tmp_path / "cache")  # another process on the same node
    assert not neighbour.exists(KEY) and neighbour.artifacts() == []
    assert not st.cache.exists(KEY) and not st.path(KEY).exists()
    assert list((tmp_path / "cache" / ".staging").iterdir()) == []


def test_a_lost_commit_caches_the_winners_copy(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Node B builds while node A publishes the same key: B's commit is refused, B's
    own bytes never reach its cache or the bucket; B's cache gets A's."""
    winner = _fill(tmp_path / "winner", "a")
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    node_b = object_store(s3_server, bucket, tmp_path / "b")

    def build(tmp: Path) -> None:
        _fill(tmp, "b")
        assert node_a.publish(winner, KEY)  # A commits while B is still building

    assert not node_b.get_or_build(KEY, build)
    assert _files(node_b.path(KEY)) == _files(winner)
    stored = _objects(s3_server, bucket, f"realign/residuals/{KEY}/")
    files = {n.rsplit("/", 1)[1]: body for n, body in stored.items() if not n.endswith(COMMIT)}
    assert len(stored) == 4 and files == _files(winner)  # B's upload is gone


def test_delete_during_another_nodes_read(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removal takes the marker first: a node holding a copy keeps reading it; a node in
    the middle of its download gets ArtifactNotFoundError and caches nothing; readers
    after it do not find the artifact."""
    import app.store.remote as remote

    src = _fill(tmp_path / "src", "a")
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    node_a.publish(src, KEY)
    with node_b.using(KEY) as path:
        node_a.remove(KEY)
        assert _objects(s3_server, bucket, f"realign/residuals/{KEY}/") == {}
        assert _files(path) == _files(src)  # the copy node B holds stays readable
    assert not node_b.exists(KEY) and node_b.artifacts() == []

    node_a.publish(src, KEY)
    node_c = object_store(s3_server, bucket, tmp_path / "c")
    first, go_on = threading.Event(), threading.Event()
    real = remote.download_file

    def slow_download(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        first.set()
        go_on.wait(30)

    monkeypatch.setattr(remote, "download_file", slow_download)
    failures: list[BaseException] = []

    def read() -> None:
        try:
            with node_c.using(KEY):
                pass
        except BaseException as exc:
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(30)
    node_a.remove(KEY)  # while node C is downloading
    go_on.set()
    reader.join(60)
    assert len(failures) == 1 and isinstance(failures[0], ArtifactNotFoundError), failures
    assert "removed" in str(failures[0])
    assert not node_c.cache.exists(KEY) and list((tmp_path / "c" / ".staging").iterdir()) == []


def test_bucket_budget_spares_new_and_unfinished_entries(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket budget never deletes an artifact committed less than a lease ago, nor
    the upload of one being built; older ones go."""
    import app.store.commit as commit

    old_key, new_key = "1" * 32, "2" * 32
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    node_a.publish(_fill(tmp_path / "old", "old"), old_key)
    patient = object_store(s3_server, bucket, tmp_path / "p", store_budget_gb=1e-9)
    assert patient.evict() == [] and node_a.exists(old_key)  # just committed: spared

    uploading, go_on = threading.Event(), threading.Event()
    real = commit.upload_file

    def slow_upload(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        uploading.set()
        go_on.wait(30)

    monkeypatch.setattr(commit, "upload_file", slow_upload)
    builder = object_store(s3_server, bucket, tmp_path / "builder")
    done: list[bool] = []
    thread = threading.Thread(
        target=lambda: done.append(builder.publish(_fill(tmp_path / "new", "new"), new_key))
    )
    thread.start()
    assert uploading.wait(30)
    time.sleep(0.2)
    hasty = object_store(s3_server, bucket, tmp_path / "h", store_budget_gb=1e-9, store_lease_s=0.1)
    assert hasty.evict() == [old_key]  # old enough now; the upload is not touched
    go_on.set()
    thread.join(60)
    assert done == [True]
    reader = object_store(s3_server, bucket, tmp_path / "reader")
    with reader.using(new_key) as path:
        assert _files(path) == _files(tmp_path / "new")
    assert not reader.exists(old_key)
