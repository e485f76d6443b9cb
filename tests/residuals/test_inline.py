"""The in-engine merge in bounded memory: row blocks, the written merge's bits."""

from __future__ import annotations

from itertools import pairwise
from math import prod
from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple
from app.merge import merge
from app.residuals.inline import COMBINE_BYTES, block_rows, stream_merged
from tests.helpers import load_dir

SCRATCH = 16 * 1024  # far below the tiny models' larger tensors (embeddings: ~200 KB scratch)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])  # exact pack (fused jobs), rounded (apply)
def test_large_tensors_merge_in_blocks_with_the_written_bits(
    llama_triple_extra_vocab: TinyTriple, tmp_path: Path, dtype: str | None
) -> None:
    t = llama_triple_extra_vocab  # instruct adds rows: the verbatim tail is blocked too
    res = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "m", alpha=0.7,
                dtype=dtype, store=tmp_path / "s")  # fmt: skip
    written = load_dir(res.out)
    pack = tmp_path / "s" / "residuals" / (res.residual_key or "")
    blocks: dict[str, list[tuple[int, int]]] = {}
    stream = stream_merged(
        pack, t.new_base, alpha=0.7, scratch_bytes=SCRATCH,
        on_block=lambda name, lo, hi: blocks.setdefault(name, []).append((lo, hi)),
    )  # fmt: skip
    seen = 0
    for name, x in stream:
        assert torch.equal(x.view(torch.uint8), written[name].view(torch.uint8)), name
        seen += 1
        # the blocks cover every row once, in order, and each fits the budget
        spans = blocks[name]
        assert spans[0][0] == 0 and spans[-1][1] == (x.shape[0] if x.dim() else 1)
        assert all(a[1] == b[0] for a, b in pairwise(spans))
        row_elems = prod(x.shape[1:])
        for lo, hi in spans:
            assert hi - lo == 1 or (hi - lo) * row_elems * COMBINE_BYTES <= SCRATCH, name
    assert seen == len(written)
    embed = written["model.embed_tokens.weight"]
    assert embed.numel() * COMBINE_BYTES > 8 * SCRATCH  # a tensor far larger than the budget
    assert len(blocks["model.embed_tokens.weight"]) >= 8  # ...merged in many blocks


def test_the_default_budget_bounds_a_large_vocabulary_embedding() -> None:
    # a 152k x 8192 bf16 embedding (2.5 GB): no whole-tensor fp32 temporary, ~1.3k rows
    rows = block_rows(8192, [2, 2, 2], 512 * 1024 * 1024, cuda=False)
    per_row = 8192 * (6 + COMBINE_BYTES)
    assert rows * per_row <= 512 * 1024 * 1024 < (rows + 1) * per_row
    assert rows < 152_064 // 100
    # CUDA holds two pinned host sets and a device copy of the inputs as well
    assert block_rows(8192, [2, 2, 2], 512 * 1024 * 1024, cuda=True) < rows
    # a row larger than the budget is still merged, one at a time
    assert block_rows(1 << 20, [4, 4], 1024, cuda=False) == 1


@pytest.mark.gpu
def test_on_cuda_blocks_give_the_written_bits(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    res = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "m", alpha=0.7,
                store=tmp_path / "s")  # fmt: skip
    written = load_dir(res.out)
    pack = tmp_path / "s" / "residuals" / (res.residual_key or "")
    for name, x in stream_merged(pack, t.new_base, 0.7, "cuda", scratch_bytes=SCRATCH):
        assert x.device.type == "cuda"
        assert torch.equal(x.cpu().view(torch.uint8), written[name].view(torch.uint8)), name
