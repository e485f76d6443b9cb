"""`scripts/gpu-check --dry-run` resolves every step of the GPU check on a machine without
a GPU or network: the pinned install it would run, this checkout's modules imported, the
gpu tests collected, the GPU benchmark run end to end on a tiny triple on the CPU, and
the report written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_resolves_every_step() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    for step in ("venv", "install", "tests", "bench", "report"):
        assert f"[{step}]" in out, f"step {step} not in the output"
    assert "torch==2.13.0 vllm==0.32.0 -e .[vllm,dev]" in out  # the pinned install
    assert re.search(r"\[tests\] dry run: [1-9]\d* gpu tests collected", out)
    for name in ("test_cuda.py", "test_vllm_gpu.py", "test_inline.py"):
        assert name in out
    assert out.rstrip().splitlines()[-2].endswith("every step resolves")
    results = Path(out.rstrip().rsplit("figures in ", 1)[1])
    report = results.read_text()
    assert "# GPU benchmark (dry run" in report
    assert "fused merge (--no-cache), cpu" in report and "first cached merge" in report
    assert "in-engine merge of the largest tensor" in report
    assert "- GPU tests: collected, not run (dry run)" in report
    assert not (ROOT / ".gpu-venv").exists()  # a dry run makes nothing here
