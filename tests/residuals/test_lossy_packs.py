"""Lossy residual packs (opt-in: int8, int4, bitdelta): the stored codes decode within
their error bound, added vocabulary rows stay exact, merges from them equal an independent
numpy dequantize-then-apply reference through every reader of packs, the format is part
of the key and the manifest (with the error it measured), and damage is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.core.errors import ArtifactCorruptError, InvalidParameterError
from app.demo.tiny import TinyTriple, make_triple
from app.merge import ResidualInput, apply, compute, fidelity, merge, verify
from app.residuals.inline import stream_merged
from app.residuals.lossy import Absmax, SignMean
from tests.helpers import exact_merge, load_dir, rewrite_tensor, stored
from tests.residuals import methods_reference as ref
from tests.residuals.test_split import _split_apply

LOSSY = ("int8", "int4", "bitdelta")
ROOT = Path(__file__).resolve().parents[2]


def _parts(pack: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(pack.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _decode(fmt: str, codes: np.ndarray, scales: np.ndarray, cols: int, group: int) -> np.ndarray:
    """R_hat from the stored codes and scales, written from the format's definition."""
    rows = codes.shape[0]
    if fmt == "int8":
        q = codes.astype(np.int32)
    elif fmt == "int4":
        pairs = np.stack([(codes & 15).astype(np.int32), (codes >> 4).astype(np.int32)], axis=-1)
        q = pairs.reshape(rows, -1)[:, :cols] - 8
    else:
        bits = np.unpackbits(codes, axis=1, bitorder="little")[:, :cols]
        q = np.where(bits == 1, 1, -1)
    per = np.repeat(scales, group or cols, axis=1)[:, :cols]
    return (q.astype(np.float32) * per).astype(np.float32)


def _reference_r(pack: Path, instruct: Path) -> dict[str, np.ndarray]:
    """Every residual tensor as fp32 R_hat, from the raw shards: decoded codes below
    common_rows, the instruct values past them, vectors as stored."""
    manifest = json.loads((pack / "manifest.json").read_text())
    parts, ins = _parts(pack), load_dir(instruct)
    group = manifest["fidelity"]["group_size"] or 0
    out = {}
    for name, t in manifest["tensors"].items():
        if len(t["shape"]) < 2:
            out[name] = parts[name].numpy()
            continue
        rows, cols = t["shape"][0], math.prod(t["shape"][1:])
        common = t["common_rows"]
        r = np.empty((rows, cols), np.float32)
        codes, scales = parts[name + "::codes"].numpy(), parts[name + "::scales"].numpy()
        r[:common] = _decode(manifest["dtype"], codes, scales, cols, group)
        r[common:] = ins[name][common:].float().reshape(rows - common, cols).numpy()
        out[name] = r.reshape(t["shape"])
    return out


def _expected_merge(
    r_hat: dict[str, np.ndarray], t: TinyTriple, alpha: float, common: dict[str, int]
) -> dict[str, torch.Tensor]:
    target, ins = load_dir(t.new_base), load_dir(t.instruct)
    out = {}
    for name, r in r_hat.items():
        c = common[name]
        tgt = target[name]
        merged = exact_merge(None, None, tgt, alpha, residual=torch.from_numpy(r[:c].copy()))
        if r.shape[0] > c:  # rows the instruct side added
            merged = torch.cat([merged, ins[name][c:].to(tgt.dtype)])
        out[name] = merged
    return out


def _same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        differ = int((g.view(torch.uint8) != w.view(torch.uint8)).sum())
        assert differ == 0, f"{name}: {differ} bytes differ from the reference"


@pytest.mark.parametrize("fmt", LOSSY)
def test_codes_decode_within_their_bound_and_added_rows_stay_exact(
    fmt: str, llama_triple_extra_vocab: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple_extra_vocab
    res = compute(str(t.base), str(t.instruct), dtype=fmt, store=tmp_path / "s")
    ins, base = load_dir(t.instruct), load_dir(t.base)
    got = load_dir(res.path)  # what the pack reader hands every merge
    want = _reference_r(res.path, t.instruct)
    parts = _parts(res.path)
    f = res.manifest.fidelity
    assert f is not None and f.format == fmt
    err2 = ref2 = 0.0
    for name, m in res.manifest.tensors.items():
        c = m.common_rows
        r = (ins[name][:c].float() - base[name].float()).numpy()
        r_hat = got[name].numpy()
        assert np.array_equal(r_hat, want[name]), name  # the reader decodes as defined
        if len(m.shape) < 2:  # vectors: kept in fp32, exactly (and part of |R|)
            assert m.dtype == "float32" and np.array_equal(r_hat, r), name
            assert f.tensors[name] == 0.0
            ref2 += float(np.square(r.astype(np.float64)).sum())
            continue
        assert m.dtype == fmt
        assert np.array_equal(r_hat[c:], ins[name][c:].float().numpy()), name  # added rows
        rows = r.reshape(c, -1)
        coded = r_hat[:c].reshape(c, -1)
        scales = parts[name + "::scales"].numpy()
        if fmt == "bitdelta":
            mean = np.abs(rows).mean(axis=1, dtype=np.float64)
            np.testing.assert_allclose(scales[:, 0], mean, rtol=1e-6)  # mean |R| per row
            assert np.array_equal(np.abs(coded), np.broadcast_to(scales, coded.shape))
            assert np.array_equal(coded >= 0, rows >= 0)  # the sign of each element
        else:
            per = np.repeat(scales, f.group_size or rows.shape[1], axis=1)[:, : rows.shape[1]]
            bound = per / 2 * (1 + 2**-20) + np.abs(coded) * 2**-24
            assert (np.abs(coded - rows) <= bound).all(), name  # off by at most scale/2
        e2 = float(np.square(coded.astype(np.float64) - rows).sum())
        r2 = float(np.square(rows.astype(np.float64)).sum())
        assert f.tensors[name] == pytest.approx(math.sqrt(e2 / r2), rel=1e-4)
        err2, ref2 = err2 + e2, ref2 + r2
    assert f.rel_error == pytest.approx(math.sqrt(err2 / ref2), rel=1e-4)
    assert t.instruct != t.base and res.manifest.vocab is not None  # rows were added


@pytest.mark.parametrize(
    ("fmt", "triple", "alpha"),
    [
        ("int8", "llama_triple_extra_vocab", 0.7),
        ("int4", "qwen_triple", 1.0),
        ("bitdelta", "llama_triple", -0.5),
        ("int8", "llama_triple_fp32", 1.0),
    ],
)
def test_merges_from_lossy_packs_equal_a_numpy_reference(
    fmt: str, triple: str, alpha: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    store = tmp_path / "s"
    first = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "first",
                  alpha=alpha, dtype=fmt, store=store)  # fmt: skip
    assert first.residual_created and first.residual_key
    pack = store / "residuals" / first.residual_key
    m = verify(first.residual_key, store)
    common = {n: x.common_rows for n, x in m.tensors.items()}
    want = _expected_merge(_reference_r(pack, t.instruct), t, alpha, common)
    _same_bits(load_dir(first.out), want)  # built with its pack
    again = apply(first.residual_key, str(t.new_base), tmp_path / "again", alpha=alpha,
                  store=store)  # fmt: skip
    _same_bits(load_dir(again.out), want)  # the stored pack applied
    _same_bits(dict(stream_merged(pack, t.new_base, alpha=alpha)), want)  # in-engine stream
    split = tmp_path / "split"
    (tmp_path / "work").mkdir()
    _split_apply(pack, t.new_base, split, alpha, tmp_path / "work")  # one worker per shard
    _same_bits(load_dir(split), want)


def test_several_lossy_residuals_merge_as_the_reference(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t, store = llama_triple, tmp_path / "s"
    keys = [compute(str(t.base), str(t.instruct), dtype=d, store=store).key
            for d in ("int4", "bitdelta")]  # fmt: skip
    inputs = [ResidualInput(key=keys[0], weight=1.0), ResidualInput(key=keys[1], weight=0.5)]
    apply(inputs, str(t.new_base), tmp_path / "out", alpha=0.9, store=store)
    r_hats = [_reference_r(store / "residuals" / k, t.instruct) for k in keys]
    got, target = load_dir(tmp_path / "out"), load_dir(t.new_base)
    for name, tgt in target.items():
        if not tgt.is_floating_point():
            continue
        delta = ref.weighted_sum([r[name].reshape(-1) for r in r_hats], [1.0, 0.5])
        want = ref.apply(delta, tgt.float().numpy().reshape(-1), 0.9, tgt.dtype)
        assert np.array_equal(ref.bits(got[name]), want), name


def test_format_is_in_the_key_and_the_manifest(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t, store = llama_triple, tmp_path / "s"
    made = {d: compute(str(t.base), str(t.instruct), dtype=d, store=store)
            for d in ("exact", "bfloat16", *LOSSY)}  # fmt: skip
    assert len({r.key for r in made.values()}) == len(made)  # the format is in the key
    bf16 = made["bfloat16"].manifest.storage()["weight_bytes"]
    sizes = []
    for fmt in LOSSY:
        m = made[fmt].manifest
        s = m.storage()
        assert m.dtype == s["format"] == fmt and not s["lossless"]
        assert m.fidelity is not None and s["rel_error"] == m.fidelity.rel_error > 0
        assert s["bf16_ratio"] == pytest.approx(s["weight_bytes"] / bf16, abs=0.02)
        assert f"{m.fidelity.rel_error:.3g}" in m.storage_line() and fmt in m.storage_line()
        sizes.append(s["weight_bytes"])
        index = m.files
        assert all(e.xxh3_128 and e.sha256 for n, e in index.items() if n.endswith(".safetensors"))
    assert sizes[0] < bf16 * 0.55 and sizes[1] < bf16 * 0.3 and sizes[2] < bf16 * 0.1
    int8, int4 = made["int8"].manifest.fidelity, made["int4"].manifest.fidelity
    assert int8 is not None and int4 is not None
    assert (int8.bits, int4.bits, int8.scale) == (8, 4, "absmax")
    bitdelta = made["bitdelta"].manifest.fidelity
    assert bitdelta is not None and (bitdelta.bits, bitdelta.scale) == (1, "mean-abs")
    assert int8.rel_error < int4.rel_error < bitdelta.rel_error


def test_parts_of_a_tensor_share_a_shard(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    res = compute(str(t.base), str(t.instruct), dtype="int4", store=tmp_path / "s",
                  max_shard_gb=0.0003)  # fmt: skip
    shards = sorted(res.path.glob("*.safetensors"))
    assert len(shards) >= 3
    where = {n: f.name for f in shards for n in load_file(f)}
    for name, m in res.manifest.tensors.items():
        if len(m.shape) >= 2:
            assert where[name + "::codes"] == where[name + "::scales"], name


def test_a_flipped_byte_is_refused_and_the_pack_rebuilt(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t, store = llama_triple, tmp_path / "s"
    res = compute(str(t.base), str(t.instruct), dtype="int8", store=store)
    clean = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "clean",
                  dtype="int8", store=store)  # fmt: skip
    shard = sorted(res.path.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    heard: list[str] = []
    again = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "again",
                  dtype="int8", store=store, notice=heard.append)  # fmt: skip
    assert heard  # quarantined, rebuilt from its sources: the same bits as before
    _same_bits(load_dir(again.out), load_dir(clean.out))
    assert verify(res.key, store).dtype == "int8"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=shard.name):
        verify(res.key, store)


def test_non_finite_residuals_are_refused_before_anything_is_published(tmp_path: Path) -> None:
    t = make_triple(tmp_path / "m", shards=1, seed=5)
    name = "model.layers.1.self_attn.q_proj.weight"
    w = load_dir(t.instruct)[name].clone()
    w[3, 7] = float("inf")
    rewrite_tensor(t.instruct, name, w)
    with pytest.raises(InvalidParameterError, match="--pack exact"):
        compute(str(t.base), str(t.instruct), dtype="int4", store=tmp_path / "s")
    assert not [p for p in stored(tmp_path / "s") if p.startswith("residuals/")]


@pytest.mark.parametrize("cols", [1, 7, 64, 100, 257])
def test_codecs_on_odd_widths(cols: int) -> None:
    rng = np.random.default_rng(cols)
    x = (rng.standard_t(3, size=(5, cols)) * 1e-3).astype(np.float32)
    x[1] = 0  # a row that did not change
    for fmt in (Absmax("a8", 8, 0), Absmax("a4", 4, 64), Absmax("g8", 8, 16), SignMean("b")):
        codes, scales = fmt.encode(x)
        assert codes.shape == (5, fmt.code_cols(cols)) and codes.dtype == fmt.code_dtype.name
        assert scales.shape == (5, fmt.scale_cols(cols)) and scales.dtype == np.float32
        out = np.empty_like(x)
        fmt.decode(codes, scales, out)
        name = {"a8": "int8", "a4": "int4", "g8": "int8", "b": "bitdelta"}[fmt.name]
        assert np.array_equal(out, _decode(name, codes, scales, cols, fmt.group))
        assert not out[1].any()
        if isinstance(fmt, Absmax):
            per = np.repeat(scales, fmt.group or cols, axis=1)[:, :cols]
            assert (np.abs(out - x) <= per / 2 * (1 + 2**-20) + np.abs(out) * 2**-24).all()


def test_model_fidelity_of_exact_and_lossy_packs(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t, store = llama_triple, tmp_path / "s"
    exact = compute(str(t.base), str(t.instruct), store=store)
    same = fidelity(exact.key, str(t.new_base), store=store, max_new_tokens=6)
    assert same.model.token_agreement == 1.0 and same.model.mean_kl == 0.0  # the same bits
    assert same.model.positions > 0 and same.model.prompts == 8
    bits = compute(str(t.base), str(t.instruct), dtype="bitdelta", store=store)
    lossy = fidelity(bits.key, str(t.new_base), store=store, max_new_tokens=6,
                     prompts=["Hello there", "Who is the mayor of Lakeview?"])  # fmt: skip
    assert lossy.format == "bitdelta" and lossy.model.prompts == 2
    assert 0.0 <= lossy.model.token_agreement <= 1.0 and lossy.model.mean_kl > 0


def test_cli_pack_int8_inspect_and_fidelity(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t, store = llama_triple, tmp_path / "s"

    def realign(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "app.cli", *args, "--store", str(store)]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    res = realign("compute", "-b", str(t.base), "-i", str(t.instruct), "--pack", "int8", "-q")
    assert res.returncode == 0, res.stderr
    key = res.stdout.split()[-1]
    shown = realign("inspect", key)
    assert shown.returncode == 0, shown.stderr
    assert "int8 (lossy: 8-bit absmax" in shown.stdout and "x the bf16 pack" in shown.stdout
    assert "fidelity |R^-R|/|R|" in shown.stdout and "overall" in shown.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who is the mayor of Oakford?\n\nName a river.\n")
    got = realign("fidelity", key, "-t", str(t.new_base), "--prompts", str(prompts),
                  "--tokens", "4", "--json")  # fmt: skip
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    assert report["format"] == "int8" and report["model"]["prompts"] == 2
    assert report["storage"]["rel_error"] > 0 and 0 <= report["model"]["token_agreement"] <= 1
