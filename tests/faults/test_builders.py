"""Builders of one artifact: correct without a working flock (NFS), and the staging
left by a dead builder is reclaimed once its lease runs out — never a live one's."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import StagingLostError
from app.demo.tiny import TinyTriple
from app.merge import compute
from app.store.local import LocalStore
from app.store.staging import StagingArea
from tests.helpers import start_together

ROOT = Path(__file__).resolve().parents[2]


def builder(
    t: TinyTriple,
    store: Path,
    *,
    delay: float,
    dtype: str = "bfloat16",
    gate: Path | None = None,
    go: Path | None = None,
    **env: str,
) -> subprocess.Popen[str]:
    """A process computing the residual of ``t`` into ``store``, ``delay`` s per tensor
    (``gate``: after its first tensor it waits for that file to exist; ``go``: it says
    "ready" once imported and waits for that file before it starts)."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from app.merge import compute
        gate, go = {str(gate) if gate else None!r}, {str(go) if go else None!r}
        if go:
            print("ready", flush=True)
            while not Path(go).exists():
                time.sleep(0.01)
        def slow(p):
            print("progress", p.tensors_done, flush=True)
            time.sleep({delay})
            while gate and p.tensors_done and not Path(gate).exists():
                time.sleep(0.05)
        res = compute({str(t.base)!r}, {str(t.instruct)!r}, store=Path({str(store)!r}),
                      dtype={dtype!r}, progress=slow)
        print("result", res.key, res.created, flush=True)
    """)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def artifact(path: Path) -> dict[str, object]:
    """Every file of a pack; the manifest without its creation time."""
    out: dict[str, object] = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            rel = f.relative_to(path).as_posix()
            out[rel] = f.read_bytes()
    manifest = json.loads(out.pop("manifest.json"))  # type: ignore[arg-type]
    manifest.pop("created_at")
    manifest.pop("manifest_sha256")  # seals the creation time too
    out["manifest.json"] = manifest
    return out


def staging_of(store: Path, pid: int) -> list[Path]:
    """The staging dirs whose lease names process ``pid``."""
    area = StagingArea(store / ".staging")
    return [
        p
        for p in (store / ".staging").iterdir()
        if p.is_dir() and (lease := area.read_lease(p)) is not None and lease.pid == pid
    ]


def test_eight_builders_without_flock_all_succeed_with_one_artifact(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store, single = tmp_path / "store", tmp_path / "single"
    go = tmp_path / "go"
    procs = [builder(t, store, delay=0.2, go=go, REALIGN_STORE_LOCKING="none") for _ in range(8)]
    start_together(procs, go)
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        results.append(stdout.strip().splitlines()[-1].split())
    assert sum(r[2] == "True" for r in results) >= 2  # the publish race really ran
    keys = {r[1] for r in results}
    assert len(keys) == 1
    (key,) = keys
    assert [p.name for p in (store / "residuals").iterdir()] == [key]
    assert list((store / ".staging").iterdir()) == []  # each discarded only its own
    ref = compute(str(t.base), str(t.instruct), dtype="bfloat16", store=single)
    assert artifact(store / "residuals" / key) == artifact(ref.path)


def test_publish_race_loser_keeps_the_winners_artifact(tmp_path: Path) -> None:
    """Two builders without a lock build at once; both succeed, one artifact stays."""
    stores = [LocalStore(tmp_path / "s", locking="none") for _ in range(2)]
    both = threading.Barrier(2)
    dirs: list[Path] = []

    def build(tmp: Path) -> None:
        dirs.append(tmp)
        (tmp / "data").write_text(f"built in {tmp.name}")
        both.wait(timeout=30)  # both are building now: no lock kept either out

    threads = [threading.Thread(target=s.get_or_build, args=("k" * 32, build)) for s in stores]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(dirs) == 2 and dirs[0] != dirs[1]  # unique staging names
    text = (tmp_path / "s" / "residuals" / ("k" * 32) / "data").read_text()
    assert text in {f"built in {d.name}" for d in dirs}
    assert list((tmp_path / "s" / ".staging").iterdir()) == []


def test_dead_builders_staging_is_reclaimed_after_its_lease_live_ones_never(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store = tmp_path / "store"
    lease = {"REALIGN_STORE_LEASE_S": "1"}
    dead = builder(t, store, delay=0.5, **lease)
    gate = tmp_path / "gate"  # the live one waits mid-build until the checks are done
    live = builder(t, store, delay=0.4, dtype="float32", gate=gate, **lease)  # another key
    try:
        for p in (dead, live):
            assert p.stdout is not None and p.stdout.readline().startswith("progress")
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        (dead_dir,) = staging_of(store, dead.pid)
        (live_dir,) = staging_of(store, live.pid)

        time.sleep(1.5)  # the dead builder's lease runs out; the live one renews its own
        assert StagingArea(store / ".staging", lease_s=1).sweep() == [dead_dir]
        assert not dead_dir.exists() and live_dir.exists()
        res = compute(str(t.base), str(t.instruct), store=LocalStore(store, lease_s=1))
        assert res.created  # the next builder of the dead one's key
        assert live_dir.exists() and live.poll() is None  # still building, untouched
    finally:
        gate.touch()
    stdout, stderr = live.communicate(timeout=300)
    assert live.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1].endswith("True")  # built and published
    assert list((store / ".staging").iterdir()) == []


def test_a_file_system_without_flock_works_as_locking_none(
    llama_triple: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """NFS without lockd answers flock with ENOLCK (no such mount can be made here, so
    flock is made to answer as it would): the default store falls back to lockless
    building and publishing instead of failing every job."""
    import app.store.local as local

    def no_locks(fd: int, mode: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(local.fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="app.store.local")
    t, store = llama_triple, tmp_path / "store"
    first = compute(str(t.base), str(t.instruct), store=store)
    again = compute(str(t.base), str(t.instruct), store=store)
    assert first.created and not again.created and first.key == again.key
    assert any("flock is not available" in r.getMessage() for r in caplog.records)
    ref = compute(str(t.base), str(t.instruct), store=tmp_path / "ref")
    assert artifact(first.path) == artifact(ref.path)


def test_a_paused_builder_keeps_its_staging_and_publishes_it_whole(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """SIGSTOP a builder past its lease: a sweep on its host leaves its staging alone (its
    process lives), and once resumed it publishes the whole pack."""
    t = llama_triple
    store = tmp_path / "store"
    paused = builder(t, store, delay=0.3, REALIGN_STORE_LEASE_S="1")
    assert paused.stdout is not None and paused.stdout.readline().startswith("progress")
    (staging,) = staging_of(store, paused.pid)
    paused.send_signal(signal.SIGSTOP)
    try:
        time.sleep(2.0)  # its lease ran out: nothing renews it
        lease = StagingArea(store / ".staging", lease_s=1).read_lease(staging)
        assert lease is not None and lease.expires_at < time.time()
        assert StagingArea(store / ".staging", lease_s=1).sweep() == []
        assert staging.is_dir()
    finally:
        paused.send_signal(signal.SIGCONT)
    stdout, stderr = paused.communicate(timeout=300)
    assert paused.returncode == 0, stderr
    key = stdout.strip().splitlines()[-1].split()[1]
    LocalStore(store).verify(key)  # every file there, as its manifest says


def test_a_builder_whose_staging_was_swept_publishes_nothing(tmp_path: Path) -> None:
    """A sweeper on another host removed the staging directory of a builder paused past
    its lease; resumed, the builder writes on into a directory of the same name (only
    what came after). It must not publish that."""
    store = LocalStore(tmp_path / "store")

    def build(tmp: Path) -> None:
        (tmp / "residual-00001.safetensors").write_bytes(b"weights" * 1000)
        shutil.rmtree(tmp)  # swept meanwhile, as StagingArea.sweep does it
        StagingArea.lease_path(tmp).unlink()
        (tmp / "assets").mkdir(parents=True)  # what the builder writes after it resumes
        (tmp / "manifest.json").write_text("{}")

    with pytest.raises(StagingLostError, match="was removed while this build ran"):
        store.get_or_build("0" * 32, build)
    assert not store.exists("0" * 32)
    assert list((tmp_path / "store" / ".staging").iterdir()) == []
    assert store.get_or_build("0" * 32, lambda tmp: (tmp / "f").write_text("x"))  # next one


def test_a_dead_builders_staging_is_swept_though_its_pid_lives_again(tmp_path: Path) -> None:
    """A container restarted under the same hostname gives a new process the dead
    builder's pid (here: this very process): the lease's process identity (boot and
    start time) tells them apart, and the staging goes once the lease ran out."""
    area = StagingArea(tmp_path / ".staging", lease_s=1)
    dead = tmp_path / ".staging" / f"{'0' * 32}.{'ab' * 16}"
    dead.mkdir()
    (dead / "part.bin").write_bytes(b"x" * 1000)
    lease = {
        "host": socket.gethostname(), "pid": os.getpid(), "token": "ab" * 16,
        "expires_at": time.time() - 10, "process": "another-boot:12345",
    }  # fmt: skip
    area.lease_path(dead).write_text(json.dumps(lease))
    assert area.sweep() == [dead] and not dead.exists()
