"""The first cached merge of a pair: one pass writes the residual and the merged model,
with the bits of the two-step path (compute, then apply the stored residual)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.core.errors import OperationCancelledError
from app.demo.tiny import TinyTriple
from app.merge import apply, compute, merge, verify
from tests.helpers import cancel_after, card_without_time, load_dir


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize(
    ("triple", "alpha", "dtype"),
    [
        ("llama_triple", 1.0, "bfloat16"),
        ("llama_triple_extra_vocab", 0.7, "bfloat16"),
        ("llama_triple_tied", 1.0, "float32"),
        ("qwen_triple", 0.5, "bfloat16"),
    ],
)
def test_one_pass_equals_compute_then_apply(
    triple: str, alpha: float, dtype: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    one, two = tmp_path / "one", tmp_path / "two"
    got = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp_path / "m1", alpha=alpha,
        dtype=dtype, store=one, max_shard_gb=0.0005,
    )  # fmt: skip
    assert got.residual_created and got.residual_key
    res = compute(str(t.base), str(t.instruct), dtype=dtype, store=two)
    assert res.key == got.residual_key  # same inputs, same content address
    apply(res.key, str(t.new_base), tmp_path / "m2", alpha=alpha, store=two, max_shard_gb=0.0005)
    _same(load_dir(tmp_path / "m1"), load_dir(tmp_path / "m2"))
    # one tensor order for every path: the same files, byte for byte
    shards = sorted(p.name for p in (tmp_path / "m1").glob("model*.safetensors*"))
    assert shards == sorted(p.name for p in (tmp_path / "m2").glob("model*.safetensors*"))
    for name in shards:
        assert (tmp_path / "m1" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes()
    pack_one = one / "residuals" / got.residual_key
    _same(load_dir(pack_one), load_dir(res.path))
    assert verify(got.residual_key, one).key == got.residual_key  # every sha256 recorded
    manifest = verify(got.residual_key, one)
    assert manifest.tensors.keys() == res.manifest.tensors.keys()
    for name, entry in manifest.tensors.items():
        assert entry.norm == pytest.approx(res.manifest.tensors[name].norm, rel=1e-9)
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "m1" / f).read_text() == (tmp_path / "m2" / f).read_text(), f
    cards = [card_without_time((tmp_path / m / "README.md").read_text()) for m in ("m1", "m2")]
    assert cards[0] == cards[1]  # the same card but for the minute it was made at
    # the second merge reuses the stored residual
    again = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "m3", store=one,
                  alpha=alpha, dtype=dtype)  # fmt: skip
    assert not again.residual_created and again.residual_key == got.residual_key
    _same(load_dir(tmp_path / "m1"), load_dir(tmp_path / "m3"))


def test_cancelled_one_pass_leaves_neither_residual_nor_model(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    cancel, on_progress = cancel_after(3)

    t = llama_triple
    with pytest.raises(OperationCancelledError):
        merge(
            str(t.base), str(t.instruct), str(t.new_base), tmp_path / "out", store=store_dir,
            progress=on_progress, cancel=cancel,
        )  # fmt: skip
    assert list((store_dir / "residuals").iterdir()) == []
    assert list((store_dir / ".staging").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


def test_store_merge_builds_both_in_one_pass(llama_triple: TinyTriple, tmp_path: Path) -> None:
    """The job service's path: residual and merged model both published in the store."""
    from app.merge import merge_to_store

    t = llama_triple
    one = merge_to_store(
        target=str(t.new_base), base=str(t.base), instruct=str(t.instruct), alpha=0.5,
        store=tmp_path / "one",
    )  # fmt: skip
    assert one.created and one.residual_created
    assert (tmp_path / "one" / "residuals" / one.residual_key).is_dir()
    assert verify(one.residual_key, tmp_path / "one").key == one.residual_key
    res = compute(str(t.base), str(t.instruct), store=tmp_path / "two")
    two = merge_to_store(
        target=str(t.new_base), residual=res.key, alpha=0.5, store=tmp_path / "two"
    )
    assert (one.key, one.residual_key) == (two.key, two.residual_key)  # same content addresses
    _same(load_dir(one.path), load_dir(two.path))
    again = merge_to_store(
        target=str(t.new_base), base=str(t.base), instruct=str(t.instruct), alpha=0.5,
        store=tmp_path / "one",
    )  # fmt: skip
    assert not again.created and not again.residual_created and again.key == one.key


def test_store_merge_keeps_the_residual_it_just_built(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    from app.merge import merge_to_store
    from app.store.local import LocalStore

    t = llama_triple
    tight = LocalStore(tmp_path / "s", budget_bytes=1)  # everything else may go
    got = merge_to_store(
        target=str(t.new_base), base=str(t.base), instruct=str(t.instruct), store=tight
    )
    assert got.residual_created and got.path.is_dir()
    assert (tmp_path / "s" / "residuals" / got.residual_key).is_dir()
