"""Every streaming merge path of one triple, run with given options: compute a residual
pack, apply it, the one-pass compute-and-apply (the default path of a first cached
merge) and the fused merge. Backend comparisons run it twice and compare the bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from app.demo.tiny import TinyTriple
from app.residuals.apply import apply_residual, merge_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.compute import compute_residual
from app.residuals.dtypes import DType
from app.residuals.hashing import FileHasher
from app.residuals.onepass import compute_and_apply
from app.residuals.sources import RunOptions, local_source
from tests.helpers import load_dir

PATHS = ("residual", "applied", "onepass_residual", "onepass", "fused")


def run_paths(
    t: TinyTriple, root: Path, opts: RunOptions, *, alpha: float, dtype: DType
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors each path writes under ``root`` (one directory per path)."""
    hasher = FileHasher()
    src = (local_source(t.instruct, hasher), local_source(t.base, hasher),
           local_source(t.new_base, hasher))  # fmt: skip
    for name in PATHS:
        (root / name).mkdir(parents=True)
    with (
        Checkpoint.open(t.instruct) as i,
        Checkpoint.open(t.base) as b,
        Checkpoint.open(t.new_base) as n,
    ):
        compute_residual(i, b, root / "residual", instruct_src=src[0], base_src=src[1],
                         dtype=dtype, opts=opts)  # fmt: skip
        apply_residual(root / "residual", n, root / "applied", target_src=src[2], alpha=alpha,
                       opts=opts)  # fmt: skip
        compute_and_apply(i, b, n, root / "onepass_residual", root / "onepass", sources=src,
                          dtype=dtype, alpha=alpha, opts=opts)  # fmt: skip
        merge_fused(i, b, n, root / "fused", sources=src, alpha=alpha, opts=opts)
    return {name: load_dir(root / name) for name in PATHS}


def assert_same_bits(
    want: dict[str, dict[str, torch.Tensor]], got: dict[str, dict[str, torch.Tensor]], where: str
) -> None:
    """Every path's tensors equal, byte for byte."""
    for path in PATHS:
        a, b = want[path], got[path]
        assert a.keys() == b.keys(), f"{where} {path}"
        for name in a:
            same = a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            assert same, f"{where} {path} {name}"
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), (
                f"{where} {path} {name}: bytes differ"
            )
