"""The CUDA backend gives the CPU backend's bytes (runs only where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple
from app.merge import compute, merge
from tests.helpers import load_dir


@pytest.mark.gpu
def test_cuda_merge_equals_cpu(llama_triple: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    t = llama_triple
    for device in ("cpu", "cuda"):
        merge(
            str(t.base),
            str(t.instruct),
            str(t.new_base),
            tmp_path / device,
            alpha=0.7,
            store=store_dir / device,
            device=device,
            no_cache=True,
        )
        compute(str(t.base), str(t.instruct), store=store_dir / device, device=device)
    cpu, gpu = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    # element-wise fp32 add/sub/mul are correctly rounded on both devices
    assert all(torch.equal(cpu[k], gpu[k]) for k in cpu)
    r_cpu = load_dir(next((store_dir / "cpu" / "residuals").iterdir()))
    r_gpu = load_dir(next((store_dir / "cuda" / "residuals").iterdir()))
    assert all(torch.equal(r_cpu[k], r_gpu[k]) for k in r_cpu)
