"""Exact residual packs (the default): R = instruct - base stored without loss, smaller
than the bf16 pack, and every merge from one gives exactly the bytes of ``--no-cache``."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.errors import ArtifactCorruptError
from app.demo.tiny import TinyTriple, make_triple
from app.merge import apply, compute, merge, verify
from app.residuals import native
from app.residuals.frames import FRAME_ELEMS, decode_frame, encode_frame
from app.residuals.inline import stream_merged
from tests.helpers import load_dir, rewrite_tensor
from tests.residuals.adversarial import adversarial_inputs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("model*.safetensors*"))}


def _first_heads(pack: Path) -> dict[str, bytes]:
    """The header of each tensor's first frame, by tensor: the count of corrections and
    the section heads of a 2-byte dtype (two planes, gaps, values)."""
    index = json.loads((pack / "residual.frames.json").read_text())
    heads = {}
    for name, entry in index["tensors"].items():
        with (pack / entry["file"]).open("rb") as fh:
            fh.seek(entry["frames"][0])
            heads[name] = fh.read(4 + 5 * 4)
    return heads


def _by_plane_flags(heads: dict[str, bytes]) -> list[int]:
    """The by-plane flag of the gaps and values sections of frames that hold corrections."""
    return [
        h[4 + 5 * k] & 0x80
        for h in heads.values()
        if int.from_bytes(h[:4], "little")
        for k in (2, 3)
    ]


def _same_as_no_cache(t: TinyTriple, tmp: Path, alpha: float, store: Path) -> Path:
    """Merge through the exact pack (computed here, then reused) and check every byte
    against the fused one-pass merge."""
    fused = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp / "fused", alpha=alpha,
        no_cache=True, store=store,
    )  # fmt: skip
    first = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp / "first", alpha=alpha, store=store
    )
    assert first.residual_created
    again = apply(
        first.residual_key or "", str(t.new_base), tmp / "again", alpha=alpha, store=store
    )
    want = _files(fused.out)
    assert want and _files(first.out) == want  # one pass: residual written with the merge
    assert _files(again.out) == want  # the stored pack applied
    return store / "residuals" / (first.residual_key or "")


@pytest.mark.parametrize(
    ("triple", "alphas"),
    [
        ("llama_triple", (1.0, 0.5)),
        ("llama_triple_fp32", (0.7,)),
        ("llama_triple_extra_vocab", (0.3,)),
        ("llama_triple_tied", (1.0,)),
        ("qwen_triple", (0.5, -1.25)),
    ],
)
def test_merges_from_an_exact_pack_give_the_bytes_of_no_cache(
    triple: str, alphas: tuple[float, ...], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    for k, alpha in enumerate(alphas):
        pack = _same_as_no_cache(t, tmp_path / f"a{k}", alpha, tmp_path / f"store{k}")
        manifest = verify(pack.name, tmp_path / f"store{k}")
        assert manifest.exact and manifest.storage()["lossless"]
        assert not list(pack.glob("*.safetensors"))  # frames only
        assert all(n.endswith((".frames", ".json")) or "/" in n for n in manifest.files)


def test_float16_models_and_adversarial_values(tmp_path: Path) -> None:
    """fp16 weights, and residual elements that need a correction of every kind: exponent
    gaps far beyond the format's precision, a difference that overflows fp16, subnormals,
    signed zeros, inf and NaN inputs."""
    t = make_triple(tmp_path / "m", dtype=torch.float16, shards=1, seed=3)
    name = "model.layers.0.mlp.down_proj.weight"
    tensors = {m: load_dir(d)[name] for m, d in (("i", t.instruct), ("b", t.base))}
    i, b = tensors["i"].clone(), tensors["b"].clone()
    special = [
        (60000.0, -60000.0),  # overflows fp16: the pair itself is stored
        (1024.0, 3e-5),  # exponent gap beyond fp16's 11 bits
        (6e-8, -6e-8),  # subnormals
        (0.0, -0.0),
        (-0.0, 0.0),
        (float("inf"), 1.0),
        (float("nan"), 2.0),
        (1.0, 1.0 + 2**-10),
    ]
    for k, (x, y) in enumerate(special):
        i.view(-1)[k], b.view(-1)[k] = x, y
    rewrite_tensor(t.instruct, name, i)
    rewrite_tensor(t.base, name, b)
    for alpha in (1.0, 0.25):
        _same_as_no_cache(t, tmp_path / f"a{alpha}", alpha, tmp_path / f"s{alpha}")


def test_exact_pack_is_smaller_than_bf16_on_trained_like_residuals(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    exact = compute(str(t.base), str(t.instruct), store=tmp_path / "s")
    bf16 = compute(str(t.base), str(t.instruct), dtype="bfloat16", store=tmp_path / "s")
    assert exact.key != bf16.key  # the format is part of the content key
    size = exact.manifest.storage()
    assert size["lossless"] and not bf16.manifest.storage()["lossless"]
    assert size["weight_bytes"] < bf16.manifest.storage()["weight_bytes"]
    assert size["bf16_ratio"] is not None and size["bf16_ratio"] < 1.0


def test_in_engine_stream_gives_the_written_bits(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    res = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "m", alpha=0.6,
                store=tmp_path / "s")  # fmt: skip
    written = load_dir(res.out)
    pack = tmp_path / "s" / "residuals" / (res.residual_key or "")
    streamed = dict(stream_merged(pack, t.new_base, alpha=0.6))
    assert streamed.keys() == written.keys()
    for n, x in written.items():
        assert torch.equal(x.view(torch.uint8), streamed[n].view(torch.uint8)), n


def test_a_flipped_byte_in_a_frames_file_is_refused(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store = tmp_path / "s"
    res = compute(str(t.base), str(t.instruct), store=store)
    frames = next((store / "residuals" / res.key).glob("*.frames"))
    data = bytearray(frames.read_bytes())
    data[len(data) // 3] ^= 0x10
    frames.write_bytes(bytes(data))
    # a merge that meets it quarantines it and rebuilds it from its sources: right bytes
    heard: list[str] = []
    fused = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "fused",
                  no_cache=True, store=store)  # fmt: skip
    got = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "out", store=store,
                notice=heard.append)  # fmt: skip
    assert heard and _files(got.out) == _files(fused.out)
    assert verify(res.key, store).exact
    data = bytearray(frames.read_bytes())
    data[-5] ^= 0x01
    frames.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptError, match=frames.name):
        verify(res.key, store)


@pytest.mark.parametrize("itemsize", [2, 4])
def test_frame_codec_round_trips_and_rejects_damage(itemsize: int) -> None:
    rng = np.random.default_rng(itemsize)
    dtype = {2: np.uint16, 4: np.uint32}[itemsize]
    # sizes around the sparse scan's 64-element masks; no, few and all corrections
    for n, dense in itertools.product((1, 9, 63, 64, 65, 4097, FRAME_ELEMS), (0.0, 0.05, 1.0)):
        p = rng.integers(0, 2 ** (8 * itemsize), n, dtype=np.uint64).astype(dtype)
        p[: n // 2] &= dtype(0x00FF)  # a compressible plane
        neg = np.where(rng.random(n) < dense, p | 1, 0).astype(dtype)
        frame, count = encode_frame(memoryview(p).cast("B"), memoryview(neg).cast("B"), itemsize)
        assert count == np.count_nonzero(neg)
        po, no = bytearray(n * itemsize), bytearray(n * itemsize)
        decode_frame(memoryview(frame), n, itemsize, memoryview(po), memoryview(no))
        assert bytes(po) == p.tobytes() and bytes(no) == neg.tobytes()
    with pytest.raises(ValueError):
        decode_frame(memoryview(frame[:-3]), n, itemsize, memoryview(po), memoryview(no))


def test_index_and_manifest_record_the_format(llama_triple: TinyTriple, tmp_path: Path) -> None:
    res = compute(str(llama_triple.base), str(llama_triple.instruct), store=tmp_path / "s")
    index = json.loads((res.path / "residual.frames.json").read_text())
    assert index["format"] == "realign.frames/3"
    assert res.manifest.dtype == "exact"
    for name, t in res.manifest.tensors.items():
        assert t.dtype == "bfloat16" and t.corrections is not None  # the inputs' own dtype
        assert index["tensors"][name]["shape"] == list(t.shape)
    heads = _first_heads(res.path)
    modes = [h[4 + 5] for h in heads.values()]  # the sign/exponent plane's section
    assert modes.count(2) >= len(modes) - 2, modes  # nibble-coded (not a norm's few ones)
    flags = _by_plane_flags(heads)  # gaps and values, by byte plane
    assert flags and all(flags), flags


@pytest.mark.parametrize("version", [1, 2])
def test_a_pack_of_an_earlier_frames_format_still_merges(
    llama_triple: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """Packs written before corrections were stored by byte plane (realign.frames/2) and
    before nibble-coded planes (/1, zstd only) read as they did: merges from one give the
    bytes of --no-cache."""
    from app.residuals import frames, framewriter, nibbles

    t, store = llama_triple, tmp_path / "s"
    with monkeypatch.context() as m:
        m.setattr(framewriter, "FRAMES_FORMAT", f"realign.frames/{version}")
        m.setattr(frames, "PLANE_CORRECTIONS", False)
        if version == 1:
            m.setattr(nibbles, "alphabet", lambda plane: None)
        old = compute(str(t.base), str(t.instruct), store=store)
    index = json.loads((old.path / "residual.frames.json").read_text())
    assert index["format"] == f"realign.frames/{version}"
    flags = _by_plane_flags(_first_heads(old.path))  # gaps and values, element by element
    assert flags and not any(flags)
    fused = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "fused",
                  alpha=0.7, no_cache=True, store=store)  # fmt: skip
    got = apply(old.key, str(t.new_base), tmp_path / "got", alpha=0.7, store=store)
    assert _files(got.out) == _files(fused.out) and verify(old.key, store).exact


def test_instruct_and_base_of_different_dtypes(tmp_path: Path) -> None:
    """An fp32 (or fp16) fine-tune of a bf16 base: the pack holds those tensors in fp32,
    which keeps both exactly, and merges still give the bytes of --no-cache."""
    t = make_triple(tmp_path / "m", shards=1, seed=5)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for name, dtype in zip(names, (torch.float32, torch.float16), strict=True):
        x = load_dir(t.instruct)[name].to(dtype)
        x.view(-1)[:7] += torch.tensor([1e-3, -2e-4, 3e-6, 0.5, -0.25, 1e-8, 7.0], dtype=dtype)
        rewrite_tensor(t.instruct, name, x)
    pack = _same_as_no_cache(t, tmp_path / "a", 0.7, tmp_path / "s")
    manifest = verify(pack.name, tmp_path / "s")
    assert [manifest.tensors[n].dtype for n in names] == ["float32", "float32"]


def test_per_tensor_methods_read_p_and_neg_in_blocks(
    llama_triple: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ties from an exact pack reads each tensor's p and neg block by block (each frame
    decoded once for both): the same bits whatever the block size."""
    from app.residuals import multi

    t = llama_triple
    args = (str(t.base), str(t.instruct), str(t.new_base))
    one = merge(*args, tmp_path / "one", method="ties", store=tmp_path / "s")
    monkeypatch.setattr(multi, "_PAIR_ELEMS", 777)  # many blocks, rows of 256 and 512
    two = merge(*args, tmp_path / "two", method="ties", store=tmp_path / "s")
    assert not two.residual_created and _files(one.out) == _files(two.out)


@pytest.mark.parametrize(
    ("codes", "code"),
    [
        (("BF16", "BF16"), "BF16"),
        (("F16", "F16"), "F16"),
        (("F32", "F32"), "F32"),
        (("BF16", "F16"), "F32"),
        (("F16", "F32"), "F32"),
    ],
)
def test_one_pass_split_gives_the_residual_and_split_bits(
    codes: tuple[str, str], code: str
) -> None:
    """The one-pass kernel of exact packs writes what the residual kind then the split
    write, bit for bit, with the same statistics: on weight-like data with nasty elements
    and on random bit patterns (NaN payloads, infinities, subnormals, overflows)."""
    torch_dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    uint = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
    gen, rng = torch.Generator().manual_seed(7), np.random.default_rng(7)
    cast = [
        x.to(torch_dt[c])
        for x, c in zip(adversarial_inputs(torch.float32, 2, gen), codes, strict=True)
    ]
    nasty = [x.view(torch.uint8).numpy() for x in cast]
    finite = [torch.nan_to_num(x, 0.0, 0.0, 0.0).view(torch.uint8).numpy() for x in cast]
    noise = [rng.integers(0, 256, 2 * 300_000 * (4 if c == "F32" else 2), np.uint8) for c in codes]
    for xs in (nasty, finite, noise):
        n = xs[0].nbytes // (4 if codes[0] == "F32" else 2)
        size = np.dtype(uint[code]).itemsize
        p_ref, neg_ref = bytearray(n * size), bytearray(n * size)
        ins = [(memoryview(x), c) for x, c in zip(xs, codes, strict=True)]
        stats_ref = native.combine("residual", memoryview(p_ref), code, ins, want_stats=True)
        count_ref = native.exact_split(
            ins[0][0], ins[1][0], code, memoryview(p_ref), memoryview(neg_ref), codes
        )
        p, neg = bytearray(n * size), bytearray(n * size)
        count, stats = native.exact_residual(
            ins[0][0], ins[1][0], code, memoryview(p), memoryview(neg), codes, want_stats=True
        )
        assert count == count_ref > 0
        assert np.array_equal(np.frombuffer(p, uint[code]), np.frombuffer(p_ref, uint[code]))
        assert np.array_equal(np.frombuffer(neg, uint[code]), np.frombuffer(neg_ref, uint[code]))
        assert np.array_equal(stats, stats_ref, equal_nan=True)
        assert xs is not finite or all(map(math.isfinite, stats))
