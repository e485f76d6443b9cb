"""A full disk: refused before writing when the free space cannot hold the output
(+10 %), and a disk that fills mid-write (another process, a file size limit) fails
with the path and the numbers, leaves no staging directory and publishes nothing."""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.cli.common import os_error_message
from app.core.errors import InsufficientStorageError
from app.demo.tiny import TinyTriple
from app.merge import merge_to_store
from app.residuals.dtypes import BF16
from app.residuals.shards import ShardedWriter, TensorSpec
from tests.helpers import stored, tree

ROOT = Path(__file__).resolve().parents[2]
Mount = Callable[[str], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """Mount small tmpfs file systems (``mount("8M")``); unmounted on teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {res.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def realign(*args: str, limit_fsize: int | None = None, **env: str) -> subprocess.Popen[str]:
    def limit() -> None:
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args, "-q"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=300)
    print("\nMSG", proc.returncode, stderr)
    return proc.returncode, stderr


def merge_args(t: TinyTriple, out: Path, store: Path, *extra: str) -> list[str]:
    return ["merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base),
            "-o", str(out), "--store", str(store), *extra]  # fmt: skip


def numbers(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"\((\d+) bytes\)", message)]


def leftovers(directory: Path) -> list[str]:
    return [p for p in tree(directory) if ".partial-" in p]


def test_merge_refused_before_writing_when_out_is_too_small(
    llama_triple: TinyTriple, store_dir: Path, tmpfs: Mount
) -> None:
    small = tmpfs("2M")  # the merged model is ~2.9 MB
    out = small / "merged"
    code, stderr = finish(realign(*merge_args(llama_triple, out, store_dir)))
    assert code == 1, stderr
    line = stderr.strip()
    assert len(line.splitlines()) == 1, stderr  # one line, no traceback
    assert "not enough free space" in line and str(out) in line
    needed, free = numbers(line)
    assert needed > free and 2_900_000 < needed < 4_000_000
    assert "REALIGN_STORE_BUDGET_GB" in line and "--out" in line
    assert tree(small) == [] and stored(store_dir) == []  # nothing written, anywhere


def test_compute_refused_before_writing_when_store_is_too_small(
    llama_triple: TinyTriple, tmpfs: Mount
) -> None:
    store = tmpfs("2M")
    args = ["compute", "-b", str(llama_triple.base), "-i", str(llama_triple.instruct)]
    code, stderr = finish(realign(*args, "--store", str(store)))
    assert code == 1 and "not enough free space" in stderr, stderr
    assert f"write {store}:" in stderr
    assert stored(store) == []


def test_merge_to_store_is_insufficient_storage_507(llama_triple: TinyTriple, tmpfs: Mount) -> None:
    store = tmpfs("4M")  # room for the residual or the merged model, not both
    with pytest.raises(InsufficientStorageError) as exc:
        merge_to_store(
            target=str(llama_triple.new_base),
            base=str(llama_triple.base),
            instruct=str(llama_triple.instruct),
            store=store,
        )
    err = exc.value
    assert err.code == "insufficient_storage" and err.http_status == 507
    assert err.needed is not None and err.free is not None and err.needed > err.free
    assert err.path == str(store) and isinstance(err, OSError)
    assert stored(store) == []


def test_disk_filled_by_another_process_mid_write(llama_triple: TinyTriple, tmpfs: Mount) -> None:
    disk = tmpfs("8M")  # residual + merged model (~6.4 MB with headroom) pass the check
    store, out = disk / "store", disk / "merged"
    proc = realign(*merge_args(llama_triple, out, store), REALIGN_MAX_READ_MBPS="2")
    deadline = time.monotonic() + 60
    while not (leftovers(disk) or tree(store / ".staging")):  # writing began: checks passed
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.02)
    filler = subprocess.run(
        ["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True, text=True
    )
    assert "No space left" in filler.stderr  # a second process took all the space
    code, stderr = finish(proc)
    assert code == 1, stderr
    line = stderr.strip()
    assert len(line.splitlines()) == 1, stderr
    assert "No space left on device while writing" in line and str(disk) in line
    assert "nothing was published" in line and "REALIGN_STORE_BUDGET_GB" in line
    assert "error: :" not in line
    assert stored(store) == [] and not out.exists() and leftovers(disk) == []


def test_file_size_limit_mid_write(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"  # ulimit -f: the 2.9 MB shard hits EFBIG at 1 MB
    proc = realign(*merge_args(llama_triple, out, store_dir, "--no-cache"), limit_fsize=1 << 20)
    code, stderr = finish(proc)
    assert code == 1, stderr
    line = stderr.strip()
    assert len(line.splitlines()) == 1, stderr
    assert "File too large while writing" in line and "REALIGN_MAX_SHARD_GB" in line
    assert f"{tmp_path}/.merged.partial-" in line and "model.safetensors" in line
    assert numbers(line)  # bytes still to write / free are stated
    assert not out.exists() and leftovers(tmp_path) == [] and stored(store_dir) == []


def test_cli_os_errors_never_print_an_empty_file_name() -> None:
    bare = os_error_message(OSError(errno.ENOSPC, "No space left on device"))
    assert bare.startswith("No space left on device — free space") and not bare.startswith(":")
    named = os_error_message(OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out"))
    assert named.startswith("/data/out: Disk quota exceeded — ")
    assert os_error_message(OSError(errno.EACCES, "Permission denied", "/x")) == (
        "/x: Permission denied"
    )


def test_full_default_store_names_it(
    llama_triple: TinyTriple, tmp_path: Path, tmpfs: Mount
) -> None:
    disk = tmpfs("1M")
    subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)
    store, out = disk / "store", tmp_path / "merged"
    env = {"REALIGN_MODELS_CACHE_DIR": str(store)}  # no --store: the configured one
    args = ["-b", str(llama_triple.base), "-i", str(llama_triple.instruct)]
    for cmd in (
        ["compute", *args],
        ["merge", *args, "-t", str(llama_triple.new_base), "-o", str(out)],
    ):
        code, stderr = finish(realign(*cmd, **env))
        assert code == 1, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert f"while writing {store} (0.0 MB (0 bytes) free)" in stderr
    assert stored(store) == [] and not out.exists() and leftovers(tmp_path) == []


def test_shard_writer_io_thread_reports_the_file(tmpfs: Mount) -> None:
    disk = tmpfs("4M")
    spec = TensorSpec("w", BF16, (12 * 1024 * 1024,))  # 24 MB: several 8 MB stages
    chunk = memoryview(bytearray(1024 * 1024))
    with pytest.raises(InsufficientStorageError) as exc, ShardedWriter(disk, [spec]) as writer:
        for _ in range(spec.nbytes // chunk.nbytes):
            writer.write("w", chunk)
    err = exc.value
    assert err.path == str(disk / "model.safetensors") and err.errno == errno.ENOSPC
    assert err.needed is not None and 0 < err.needed < spec.nbytes and err.free == 0
    assert f"No space left on device while writing {disk / 'model.safetensors'}" in str(err)


def test_store_and_out_on_one_file_system_add_up(llama_triple: TinyTriple, tmpfs: Mount) -> None:
    disk = tmpfs("5M")  # residual or merged model alone fits (3.3 MB each), both do not
    store, out = disk / "store", disk / "merged"
    code, stderr = finish(realign(*merge_args(llama_triple, out, store)))
    assert code == 1, stderr
    assert f"to write {store} and {out}: needs" in stderr
    needed, free = numbers(stderr)
    assert needed > 6_000_000 and 3_400_000 < free < needed
    assert stored(store) == [] and not out.exists()
