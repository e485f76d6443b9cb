"""The content-addressed store: idempotence, locking, crash safety, integrity, eviction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.core.errors import (
    AmbiguousKeyError,
    ArtifactInUseError,
    ArtifactNotFoundError,
    IntegrityError,
    OperationCancelledError,
)
from app.demo.tiny import TinyTriple
from app.merge import compute, list_artifacts, merge, open_store, remove, verify
from app.store.local import LocalStore
from tests.helpers import cancel_after, stored

ROOT = Path(__file__).resolve().parents[2]


def _slow_compute_script(t: TinyTriple, store: Path, delay: float) -> str:
    return textwrap.dedent(f"""
        import time
        from pathlib import Path
        from app.merge import compute
        def slow(p):
            print("progress", p.tensors_done, flush=True)
            time.sleep({delay})
        res = compute({str(t.base)!r}, {str(t.instruct)!r}, store=Path({str(store)!r}),
                      progress=slow)
        print("result", res.key, res.created, flush=True)
    """)


def _spawn(script: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_same_inputs_same_key_and_reuse(llama_triple: TinyTriple, store_dir: Path) -> None:
    t = llama_triple
    first = compute(str(t.base), str(t.instruct), store=store_dir)
    again = compute(str(t.base), str(t.instruct), store=store_dir)
    fp32 = compute(str(t.base), str(t.instruct), store=store_dir, dtype="float32")
    assert first.created and not again.created
    assert first.key == again.key != fp32.key
    assert first.manifest.key == first.key
    assert len(list_artifacts(store_dir)) == 2


def test_concurrent_identical_computes_do_the_work_once(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    procs = [_spawn(_slow_compute_script(llama_triple, store_dir, 0.02)) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        results.append(stdout.strip().splitlines()[-1].split())
    keys = {r[1] for r in results}
    assert len(keys) == 1
    assert sorted(r[2] for r in results) == ["False", "True"]  # one built, one reused
    assert len(stored(store_dir)) > 0 and len(list(store_dir.glob("residuals/*"))) == 1


def test_killed_compute_leaves_nothing_and_next_run_cleans_up(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    lease = {"REALIGN_STORE_LEASE_S": "1"}
    proc = _spawn(_slow_compute_script(llama_triple, store_dir, 0.5), env=lease)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(store_dir.glob("residuals/*")) == []  # nothing a reader could find
    time.sleep(1.2)  # the dead builder's lease runs out
    st = LocalStore(store_dir, lease_s=1)
    res = compute(str(llama_triple.base), str(llama_triple.instruct), store=st)
    assert res.created
    assert list((store_dir / ".staging").iterdir()) == []  # the dead builder's files are gone


def test_cancel_leaves_no_partial_artifact(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    cancel, on_progress = cancel_after(3)

    t = llama_triple
    with pytest.raises(OperationCancelledError):
        compute(str(t.base), str(t.instruct), store=store_dir, progress=on_progress, cancel=cancel)
    assert stored(store_dir) == []
    with pytest.raises(OperationCancelledError):
        merge(
            str(t.base),
            str(t.instruct),
            str(t.new_base),
            tmp_path / "out",
            store=store_dir,
            no_cache=True,
            progress=on_progress,
            cancel=cancel,
        )
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_verify_detects_tampering(llama_triple: TinyTriple, store_dir: Path) -> None:
    res = compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir)
    assert verify(res.key[:8], store_dir).key == res.key
    shard = sorted(res.path.glob("residual*.frames"))[0]  # the default, exact pack
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its recorded checksum"):
        verify(res.key, store_dir)


def test_remove_refused_while_in_use(llama_triple: TinyTriple, store_dir: Path) -> None:
    res = compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir)
    store = open_store(store_dir)
    with store.using(res.key):
        with pytest.raises(ArtifactInUseError):
            remove(res.key, store_dir)
        assert store.evict() == []
    assert remove(res.key[:10], store_dir) == res.key
    with pytest.raises(ArtifactNotFoundError):
        remove(res.key, store_dir)


def test_lru_eviction_respects_budget_and_readers(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    t = llama_triple
    a = compute(str(t.base), str(t.instruct), store=store_dir, dtype="bfloat16")
    size = a.manifest.total_bytes
    small = LocalStore(store_dir, budget_bytes=int(size * 1.5) + 200_000)
    with small.using(a.key):  # a is in use: the new one may not push it out
        b = compute(str(t.base), str(t.instruct), store=small, dtype="float16")
        assert {x.key for x in small.artifacts()} == {a.key, b.key}
    c = compute(str(t.base), str(t.instruct), store=small, dtype="float32")
    keys = {x.key for x in small.artifacts()}
    assert c.key in keys and a.key not in keys  # least recently used went first


def test_prefix_resolution(store_dir: Path) -> None:
    store = open_store(store_dir)
    for key in ("abc123", "abc456"):
        (store_dir / "residuals" / key).mkdir()
    assert store.resolve("abc1") == "abc123"
    with pytest.raises(AmbiguousKeyError):
        store.resolve("abc")
    with pytest.raises(ArtifactNotFoundError, match="realign ls"):
        store.resolve("fff")


def test_read_verifier_hashes_each_byte_once_in_order(tmp_path: Path) -> None:
    """Reads with gaps, repeats and an unread tail give the file's sha256; a flipped
    byte where the pipeline never looked (a header) is still caught."""
    import hashlib

    from app.residuals.integrity import ReadVerifier

    data = os.urandom(1 << 20)
    f = tmp_path / "shard.safetensors"
    f.write_bytes(data)
    view = memoryview(data)
    check = ReadVerifier({f: (len(data), hashlib.sha256(data).hexdigest())}, "pack")
    check.consume(f, 1000, view[1000:5000], stable=True)  # [0, 1000) is read by the verifier
    check.consume(f, 2000, view[2000:3000])  # read again: hashed once
    check.consume(f, 5000, view[5000:600_000], stable=True)
    check.finish()  # the tail is read by the verifier

    bad = bytearray(data)
    bad[10] ^= 1
    f.write_bytes(bytes(bad))
    check = ReadVerifier({f: (len(data), hashlib.sha256(data).hexdigest())}, "pack")
    check.consume(f, 1000, memoryview(bytes(bad))[1000:], stable=True)
    with pytest.raises(IntegrityError, match=r"pack: shard\.safetensors does not match"):
        check.finish()


def test_a_stored_merge_computes_its_residual_with_the_requested_method(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """The method of the request names the residual (key and manifest) that the first
    stored merge of a pair writes, instead of a fixed one."""
    from app.merge import merge_to_store
    from app.residuals.methods import METHODS, TaskArithmetic, register_method

    class Probe(TaskArithmetic):
        name = "probe_task_arithmetic"
        native = False  # the torch path: the same bits

    t = llama_triple
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    register_method(Probe())
    try:
        probe = merge_to_store(**req, method=Probe.name, store=tmp_path / "s")
    finally:
        METHODS.pop(Probe.name)
    plain = merge_to_store(**req, store=tmp_path / "s")
    assert probe.manifest.method == Probe.name and plain.manifest.method == "task_arithmetic"
    assert probe.residual_created and plain.residual_created
    assert probe.residual_key != plain.residual_key
    weights = sorted(probe.path.glob("*.safetensors"))
    assert [p.read_bytes() for p in weights] == [
        (plain.path / p.name).read_bytes() for p in weights
    ]
