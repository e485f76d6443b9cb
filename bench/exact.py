"""Bit-exactness check of the streaming engine on small generated triples.

Every output tensor must equal the exact ``target + a * (instruct - base)`` (``a`` =
alpha in fp32) rounded once to the output dtype — for compute + apply, the exact
``target + a * R`` of the stored fp32 residual — with rows only the instruct model
has copied from it; for the fused pass and for compute + apply, across dtypes,
alphas, chunk sizes that split rows unevenly and shard limits that force several
shards. The reference (``tests/helpers.py``) shares no code with the engine.

    .venv/bin/python bench/exact.py
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo.tiny import make_triple
from app.merge import apply, compute, merge
from app.residuals.apply import merge_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.hashing import FileHasher
from app.residuals.sources import RunOptions, local_source
from tests.helpers import exact_merge


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference(
    root: Path, name: str, alpha: float, out_dtype: torch.dtype, residual: Path | None
) -> torch.Tensor:
    i, b, t = (load_dir(root / d)[name] for d in ("instruct", "base", "new_base"))
    rows = b.shape[0]
    if residual is not None:
        merged = exact_merge(None, None, t, alpha, residual=load_dir(residual)[name][:rows])
    else:
        merged = exact_merge(i[:rows], b, t, alpha)
    return torch.cat([merged, i[rows:].to(out_dtype)]) if i.shape != b.shape else merged


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8))) if a.numel() else True


def check(root: Path, out: Path, alpha: float, label: str, residual: Path | None = None) -> int:
    got = load_dir(out)
    bad = 0
    for name, tensor in got.items():
        ref = reference(root, name, alpha, tensor.dtype, residual)
        if not same_bits(tensor, ref):
            bad += 1
            print(f"  MISMATCH {label}: {name}")
    print(f"{label}: {len(got)} tensors, {bad} differ")
    return bad


def run_case(tmp: Path, dtype: torch.dtype, extra: int, alpha: float) -> int:
    root = tmp / f"{str(dtype)[6:]}-x{extra}"
    if not root.exists():
        make_triple(root, dtype=dtype, extra_instruct_tokens=extra)
    tag = f"{root.name} alpha={alpha}"
    store = tmp / "store"
    bad = 0
    out = tmp / f"fused-{root.name}-{alpha}"
    merge(
        str(root / "base"),
        str(root / "instruct"),
        str(root / "new_base"),
        out,
        alpha=alpha,
        store=store,
        no_cache=True,
    )
    bad += check(root, out, alpha, f"fused {tag}")
    res = compute(str(root / "base"), str(root / "instruct"), dtype="float32", store=store)
    out = tmp / f"apply-{root.name}-{alpha}"
    apply(res.key, str(root / "new_base"), out, alpha=alpha, store=store)
    bad += check(root, out, alpha, f"compute(fp32)+apply {tag}", residual=res.path)
    for chunk, shard in ((50_021, 300_000), (7, 10**9)):
        out = tmp / f"small-{root.name}-{alpha}-{chunk}"
        out.mkdir()
        hasher = FileHasher()
        refs = [root / d for d in ("instruct", "base", "new_base")]
        with (
            Checkpoint.open(refs[0]) as i,
            Checkpoint.open(refs[1]) as b,
            Checkpoint.open(refs[2]) as t,
        ):
            srcs = tuple(local_source(p, hasher) for p in refs)
            opts = RunOptions(chunk_elems=chunk, max_shard_bytes=shard)
            merge_fused(i, b, t, out, sources=srcs, alpha=alpha, opts=opts)  # type: ignore[arg-type]
        bad += check(root, out, alpha, f"fused chunk={chunk} shard={shard} {tag}")
    return bad


def main() -> None:
    bad = 0
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as d:
        tmp = Path(d)
        cases = itertools.product((torch.bfloat16, torch.float16, torch.float32), (0, 3))
        for (dtype, extra), alpha in itertools.product(cases, (1.0, 0.7)):
            bad += run_case(tmp, dtype, extra, alpha)
    print("OK: bit-identical" if not bad else f"FAILED: {bad} tensors differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
