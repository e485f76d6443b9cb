"""Devices are checked before any input is read: one-line errors, real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.core.errors import DeviceUnavailableError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.residuals.devices import check_device, parse_device

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def realign(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    return lines[0]


def test_device_strings_parse_without_a_device() -> None:
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("CUDA:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "cuda:-1", ""):
        with pytest.raises(DeviceUnavailableError, match="use cpu, cuda or cuda:N"):
            parse_device(bad)
    assert Settings(device="cuda:0").device == "cuda:0"


def test_realign_device_setting_accepts_cuda_n_and_refuses_others() -> None:
    code = "from app.core.settings import load_settings; print(load_settings().device)"
    run = [sys.executable, "-c", code]
    ok = subprocess.run(run, cwd=ROOT, env={**os.environ, "REALIGN_DEVICE": "cuda:0"},
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == "cuda:0"
    bad = subprocess.run(run, cwd=ROOT, env={**os.environ, "REALIGN_DEVICE": "gpu0"},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "REALIGN_DEVICE=gpu0: must be cpu, cuda or cuda:N" in bad.stderr


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_merge_on_a_missing_gpu_fails_at_once_and_reads_nothing(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store, out = tmp_path / "store", tmp_path / "out"
    started = time.monotonic()
    proc = realign("merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base),
                   "-o", str(out), "--store", str(store), "--device", "cuda:3")  # fmt: skip
    line = one_line(proc)
    assert "'cuda:3'" in line and "no CUDA device" in line
    assert time.monotonic() - started < 60
    assert not out.exists() and not store.exists()  # no staging, no store, no output
    # inputs that do not even exist: the device is refused first, so none was opened
    missing = tmp_path / "nowhere"
    proc = realign("merge", "-b", str(missing), "-i", str(missing), "-t", str(missing),
                   "-o", str(out), "--store", str(store), "--device", "cuda:3")  # fmt: skip
    assert "cuda:3" in one_line(proc) and not store.exists()


def test_a_bad_device_string_is_one_line(tmp_path: Path) -> None:
    m = str(tmp_path / "m")
    proc = realign("merge", "-b", m, "-i", m, "-t", m, "-o", str(tmp_path / "o"),
                   "--store", str(tmp_path / "s"), "--device", "tpu")  # fmt: skip
    assert "unknown device 'tpu'" in one_line(proc)
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_a_cuda_worker_refuses_to_start_without_cuda() -> None:
    proc = realign("worker", REALIGN_DEVICE="cuda", REALIGN_REDIS_URL="redis://127.0.0.1:6379/15")
    assert "no CUDA device" in one_line(proc)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_worker_gpus_are_checked_before_any_worker_starts() -> None:
    redis = {"REALIGN_REDIS_URL": "redis://127.0.0.1:6379/15"}
    assert "no CUDA device" in one_line(realign("worker", "--gpus", "0,1", **redis))
    assert "e.g. --gpus 0,1" in one_line(realign("worker", "--gpus", "0,x", **redis))
    assert "names a GPU twice" in one_line(realign("worker", "--gpus", "1,1", **redis))


@pytest.mark.gpu
def test_gpu_indices_past_the_last_are_refused() -> None:
    count = torch.cuda.device_count()
    assert check_device("cuda:0") == "cuda:0" and check_device("cuda") == "cuda"
    with pytest.raises(DeviceUnavailableError, match=f"has {count} CUDA device"):
        check_device(f"cuda:{count}")
