"""Apply-time merge methods (TIES, DARE) and several residuals in one pass: the bits equal
an independent numpy reference, are reproducible, and reuse one stored pack."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from app.core.errors import IncompatibleModelsError, InvalidParameterError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple, make_triple, write_model
from app.merge import ResidualInput, apply, compute, merge, merge_to_store
from app.residuals import sparsify
from app.residuals.inline import stream_merged
from app.store.keys import merged_key
from tests.helpers import load_dir
from tests.residuals import methods_reference as ref


@dataclass(frozen=True)
class Packs:
    """A store with the packs of a triple: instruct's, and a second (domain) residual."""

    store: Path
    triple: TinyTriple
    instruct: str
    domain: str
    domain_model: Path

    def path(self, key: str) -> Path:
        return self.store / "residuals" / key


def _packs(root: Path, triple: TinyTriple, dtype: torch.dtype) -> Packs:
    domain = write_model(root / "domain", seed=11, dtype=dtype, like=triple.base, delta_scale=0.005)
    store = root / "store"
    res_dtype = "float32" if dtype == torch.float32 else "bfloat16"
    keys = [
        compute(str(triple.base), str(i), dtype=res_dtype, store=store, settings=Settings()).key
        for i in (triple.instruct, domain)
    ]
    return Packs(store, triple, keys[0], keys[1], domain)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory, llama_triple: TinyTriple) -> Packs:
    return _packs(tmp_path_factory.mktemp("methods_bf16"), llama_triple, torch.bfloat16)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, llama_triple_fp32: TinyTriple) -> Packs:
    return _packs(tmp_path_factory.mktemp("methods_fp32"), llama_triple_fp32, torch.float32)


def _check(out: Path, expected: dict[str, object]) -> None:
    got = load_dir(out)
    assert set(expected) <= set(got)
    for name, want in expected.items():
        have = ref.bits(got[name])
        differ = int((have != want).sum())  # type: ignore[operator]
        assert differ == 0, f"{name}: {differ} of {have.size} elements differ from the reference"


def _apply(p: Packs, out: Path, keys: list[tuple[str, float]], method: str, **kw: object) -> None:
    residuals = [ResidualInput(key=k, weight=w) for k, w in keys]
    apply(
        residuals, str(p.triple.new_base), out, method=method, store=p.store,
        settings=Settings(), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("which", "density", "alpha"),
    [("bf16", 0.05, 1.0), ("bf16", 0.3, 0.7), ("fp32", 0.5, 1.0), ("fp32", 0.2, -0.4)],
)
def test_ties_equals_the_numpy_reference(
    request: pytest.FixtureRequest, tmp_path: Path, which: str, density: float, alpha: float
) -> None:
    p: Packs = request.getfixturevalue(which)
    params = {"density": density}
    _apply(p, tmp_path / "out", [(p.instruct, 1.0)], "ties", params=params, alpha=alpha)
    packs = [(p.path(p.instruct), 1.0)]
    _check(tmp_path / "out", ref.merged_bits("ties", params, packs, p.triple.new_base, alpha))


@pytest.mark.parametrize(
    ("which", "rate", "seed"), [("bf16", 0.5, 0), ("bf16", 0.9, 7), ("fp32", 0.3, 123)]
)
def test_dare_equals_the_numpy_reference(
    request: pytest.FixtureRequest, tmp_path: Path, which: str, rate: float, seed: int
) -> None:
    p: Packs = request.getfixturevalue(which)
    params = {"drop_rate": rate, "seed": seed}
    _apply(p, tmp_path / "out", [(p.instruct, 1.0)], "dare", params=params)
    packs = [(p.path(p.instruct), 1.0)]
    _check(tmp_path / "out", ref.merged_bits("dare", params, packs, p.triple.new_base, 1.0))
    dropped = load_dir(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"]
    assert dropped.numel() > 100_000  # and the drop rate is the one asked for:
    delta = ref.dare([ref.load_f32(p.path(p.instruct))["lm_head.weight"]], [1.0], rate, seed, "x")
    assert abs(float((delta == 0).mean()) - rate) < 0.01


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.25}),
        ("dare", {"drop_rate": 0.6, "seed": 5}),
    ],
)
def test_several_residuals_in_one_pass_equal_the_reference(
    bf16: Packs, tmp_path: Path, method: str, params: dict[str, float | int]
) -> None:
    keys = [(bf16.instruct, 1.0), (bf16.domain, 0.5)]
    _apply(bf16, tmp_path / "out", keys, method, params=params, alpha=0.9)
    packs = [(bf16.path(k), w) for k, w in keys]
    expected = ref.merged_bits(method, params, packs, bf16.triple.new_base, 0.9)
    _check(tmp_path / "out", expected)
    made = json.loads((tmp_path / "out" / "realign.json").read_text())
    assert made["method"] == method and made["residual_key"] == bf16.instruct
    assert [(r["key"], r["weight"]) for r in made["residuals"]] == keys


def test_ties_at_density_1_and_dare_at_rate_0_are_task_arithmetic(
    bf16: Packs, tmp_path: Path
) -> None:
    t = bf16.triple
    classic = apply(bf16.instruct, str(t.new_base), tmp_path / "ta", store=bf16.store)
    want = {n: ref.bits(x) for n, x in load_dir(classic.out).items()}
    for method, params in (("ties", {"density": 1.0}), ("dare", {"drop_rate": 0.0})):
        _apply(bf16, tmp_path / method, [(bf16.instruct, 1.0)], method, params=params)
        _check(tmp_path / method, want)  # type: ignore[arg-type]


def _digest(out: Path) -> dict[str, str]:
    tensors = load_dir(out)
    return {n: hashlib.sha256(ref.bits(t).tobytes()).hexdigest() for n, t in tensors.items()}


def test_same_bits_across_runs_shard_sizes_and_pack_layouts(
    bf16: Packs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = bf16.triple
    keys = [(bf16.instruct, 1.0), (bf16.domain, 0.5)]
    params = {"drop_rate": 0.7, "seed": 42}
    _apply(bf16, tmp_path / "a", keys, "dare", params=params)
    _apply(bf16, tmp_path / "b", keys, "dare", params=params, max_shard_gb=0.0002)
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 2  # several output shards
    # A pack of many small shards (another layout of the same residual), another store.
    other = tmp_path / "store"
    small = [
        compute(
            str(t.base),
            str(i),
            dtype="bfloat16",
            store=other,
            max_shard_gb=0.0001,
            settings=Settings(),
        ).key
        for i in (t.instruct, bf16.domain_model)
    ]
    assert len(list((other / "residuals" / small[0]).glob("*.safetensors"))) > 2
    monkeypatch.setattr(sparsify, "_RNG_CHUNK", 1000)  # the stream drawn in pieces
    residuals = [ResidualInput(key=k, weight=w) for k, w in zip(small, (1.0, 0.5), strict=True)]
    apply(residuals, str(t.new_base), tmp_path / "c", method="dare", params=params, store=other)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == _digest(tmp_path / "c")
    _apply(bf16, tmp_path / "d", keys, "dare", params={**params, "seed": 43})
    assert _digest(tmp_path / "d") != _digest(tmp_path / "a")


def test_one_stored_pack_serves_every_method_and_keys_hold_method_and_params(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    t = llama_triple
    pair = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    runs = [
        merge_to_store(**pair, store=store_dir),
        merge_to_store(**pair, store=store_dir, method="ties", params={"density": 0.2}),
        merge_to_store(**pair, store=store_dir, method="ties"),  # the default density
        merge_to_store(**pair, store=store_dir, method="ties", params={"density": 0.5}),
        merge_to_store(**pair, store=store_dir, method="dare", params={"seed": 1}),
    ]
    assert len({r.residual_key for r in runs}) == 1
    assert len(list((store_dir / "residuals").iterdir())) == 1
    assert [r.created for r in runs] == [True, True, False, True, True]
    assert len({r.key for r in runs}) == 4
    # task arithmetic of one residual keeps the key it always had
    legacy = {"kind": "merged", "residual": runs[0].residual_key, "alpha": "1.0"}
    legacy["target"] = runs[0].manifest.target.digest
    payload = json.dumps({"schema": 1, **legacy}, sort_keys=True)
    assert runs[0].key == hashlib.sha256(payload.encode()).hexdigest()[:32]
    assert runs[0].key == merged_key(runs[0].residual_key, legacy["target"], alpha=1.0)
    assert runs[1].manifest.params == {"density": 0.2} and runs[0].manifest.params == {}


def test_in_engine_stream_gives_the_written_bits(bf16: Packs, tmp_path: Path) -> None:
    params = {"drop_rate": 0.4, "seed": 9}
    _apply(bf16, tmp_path / "out", [(bf16.instruct, 1.0)], "dare", params=params, alpha=0.5)
    written = load_dir(tmp_path / "out")
    stream = stream_merged(
        bf16.path(bf16.instruct), bf16.triple.new_base, 0.5, method="dare", params=params
    )
    seen = 0
    for name, tensor in stream:
        assert (ref.bits(tensor) == ref.bits(written[name])).all(), name
        seen += 1
    assert seen == len(written)


def test_one_residual_with_added_vocabulary(
    llama_triple_extra_vocab: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple_extra_vocab
    res = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp_path / "out", method="ties",
        params={"density": 0.3}, store=tmp_path / "store",
    )  # fmt: skip
    assert res.residual_key is not None
    pack = tmp_path / "store" / "residuals" / res.residual_key
    rows = load_dir(pack)["model.embed_tokens.weight"].shape[0]
    out = load_dir(tmp_path / "out")["model.embed_tokens.weight"]
    assert out.shape[0] == rows > load_dir(t.new_base)["model.embed_tokens.weight"].shape[0]
    instruct_rows = load_dir(t.instruct)["model.embed_tokens.weight"]
    common = load_dir(t.new_base)["model.embed_tokens.weight"].shape[0]
    assert torch.equal(out[common:], instruct_rows[common:])  # added rows taken verbatim
    second = compute(str(t.base), str(t.instruct), store=tmp_path / "store").key
    with pytest.raises(IncompatibleModelsError, match="only be applied alone"):
        apply(
            [ResidualInput(key=res.residual_key), ResidualInput(key=second, weight=0.5)],
            str(t.new_base), tmp_path / "two", store=tmp_path / "store",
        )  # fmt: skip
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tie"}, "unknown merge method 'tie'; known: dare, task_arithmetic, ties"),
        ({"method": "ties", "params": {"density": 0}}, "density=0.0 is out of range"),
        ({"method": "ties", "params": {"drop_rate": 0.1}}, "ties has no parameter 'drop_rate'"),
        ({"method": "dare", "params": {"seed": 1.5}}, "seed must be a whole number"),
        ({"method": "dare", "params": {"seed": True}}, "seed must be a number"),
        ({"params": {"density": 0.5}}, "task_arithmetic has no parameter 'density'"),
        ({"method": "dare", "no_cache": True}, "drop --no-cache"),
    ],
)
def test_bad_methods_and_params_are_refused_before_any_work(
    llama_triple: TinyTriple, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    t = llama_triple
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(")):
        merge(
            str(t.base), str(t.instruct), str(t.new_base), tmp_path / "out",
            store=tmp_path / "store", **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "store" / "residuals").exists()


def test_zero_weight_is_refused(bf16: Packs, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"residuals\[1\]: weight must be"):
        _apply(bf16, tmp_path / "out", [(bf16.instruct, 1.0), (bf16.domain, 0.0)], "ties")


def test_fresh_pair_merge_by_method(tmp_path: Path) -> None:
    """A pair never seen: its pack is computed, then the method applies it."""
    t = make_triple(tmp_path / "m", shards=1, seed=3)
    res = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp_path / "out", method="ties",
        store=tmp_path / "store",
    )  # fmt: skip
    assert res.residual_created and res.manifest.params == {"density": 0.2}
    pack = tmp_path / "store" / "residuals" / str(res.residual_key)
    _check(
        tmp_path / "out", ref.merged_bits("ties", {"density": 0.2}, [(pack, 1.0)], t.new_base, 1.0)
    )
