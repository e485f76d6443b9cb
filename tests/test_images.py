"""The api image builds from docker/Dockerfile and runs: scripts/build-images builds it
daemonless (buildah, on a Debian-made Python base) and smoke-tests it (`realign merge`
of tiny checkpoints, `realign serve` + `realign worker` running a merge job, probes); a
gpu build without the disk it needs is refused before any build starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/realign-api:local"


@pytest.fixture(scope="module")
def built() -> str:
    # Cold (tools, base image, every layer): ~7 min on 2 cores; with the layer cache ~40 s.
    res = subprocess.run(
        [ROOT / "scripts" / "build-images", "--target", "api"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_api_image_merges_and_serves(built: str) -> None:
    merged = re.findall(
        r"^(\S+): 21 tensors equal new_base \+ 0\.5 \* \(instruct - base\)$", built, re.M
    )
    # `realign merge` in a container, then the merge job run by `realign worker`
    assert merged[0] == "/out/merged" and merged[1].startswith("/models_cache/merged/"), built
    assert json.loads(built.split("healthz: ", 1)[1].splitlines()[0]) == {
        "status": "ok",
        "detail": "alive",
    }
    assert json.loads(built.split("readyz: ", 1)[1].splitlines()[0])["detail"] == "ready", built


@pytest.mark.slow
def test_api_image_config(built: str) -> None:
    res = subprocess.run(
        ["podman", "image", "inspect", IMAGE], capture_output=True, text=True, check=True
    )
    image = json.loads(res.stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--", "realign"] and config["Cmd"] == ["serve"]
    assert "REALIGN_SERVE_ROLE=api" in config["Env"]
    # buildah keeps HEALTHCHECK only in the docker image format
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    assert "/models_cache" in config["Volumes"]


def _build_gpu(**env: str) -> subprocess.CompletedProcess[str]:
    """`scripts/build-images --target api --target gpu` with ``env`` added."""
    return subprocess.run(
        [ROOT / "scripts" / "build-images", "--target", "api", "--target", "gpu"],
        capture_output=True,
        text=True,
        timeout=600,  # installs podman and buildah with apt where they are missing
        env={**os.environ, **env},
    )


def test_a_gpu_build_without_room_is_refused_before_any_build() -> None:
    """Every target's space is checked before the first build: no half-built api image,
    no base image made, one line naming the directory and the setting."""
    res = _build_gpu(REALIGN_GPU_MIN_FREE_GIB="1000000")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "needs about 1000000 GiB free under /var/lib" in res.stderr, res.stderr
    assert "REALIGN_GPU_MIN_FREE_GIB" in res.stderr
    assert "building target" not in res.stderr and "time: base" not in res.stderr


def test_a_gpu_build_whose_temporary_directory_is_small_is_refused(tmp_path: Path) -> None:
    """buildah archives the new layer under TMPDIR first: a small TMPDIR on its own
    filesystem (a real 64 MiB tmpfs) is refused before any build."""
    point = tmp_path / "small"
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)]
    done = subprocess.run(mount, capture_output=True, text=True)
    assert done.returncode == 0, f"mount failed (the test command runs as root): {done.stderr}"
    try:
        res = _build_gpu(TMPDIR=str(point))
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"needs about 20 GiB free under {point}" in res.stderr, res.stderr
    assert "point TMPDIR at a larger filesystem" in res.stderr
    assert "building target" not in res.stderr
