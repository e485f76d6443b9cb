"""The arithmetic, proved on real generated checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.demo.tiny import TinyTriple
from app.merge import apply, compute, merge
from tests.helpers import exact_merge, load_dir


def test_fp32_residual_round_trip_is_bit_exact(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    res = compute(
        str(llama_triple.base), str(llama_triple.instruct), dtype="float32", store=store_dir
    )
    apply(res.key, str(llama_triple.base), tmp_path / "back", store=store_dir)
    got, want = load_dir(tmp_path / "back"), load_dir(llama_triple.instruct)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor), name


def test_exact_residual_round_trip_is_the_instruct_model(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """base + (instruct - base), from the default (exact) pack, is the instruct model."""
    res = compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir)
    assert res.manifest.dtype == "exact"
    apply(res.key, str(llama_triple.base), tmp_path / "back", store=store_dir)
    got, want = load_dir(tmp_path / "back"), load_dir(llama_triple.instruct)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_bf16_residual_round_trip_within_one_ulp(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    res = compute(
        str(llama_triple.base), str(llama_triple.instruct), dtype="bfloat16", store=store_dir
    )
    assert res.manifest.dtype == "bfloat16"
    apply(res.key, str(llama_triple.base), tmp_path / "back", store=store_dir)
    got, want = load_dir(tmp_path / "back"), load_dir(llama_triple.instruct)
    base = load_dir(llama_triple.base)
    for name, tensor in want.items():
        # One bf16 ulp at the magnitude of the values involved (R is rounded to bf16 once,
        # the sum once more).
        exact_r = tensor.double() - base[name].double()
        scale = torch.maximum(tensor.double().abs(), exact_r.abs()).clamp_min(1e-30)
        ulp = torch.ldexp(torch.ones_like(scale), torch.frexp(scale).exponent - 8)
        err = (got[name].double() - tensor.double()).abs()
        assert bool((err <= ulp).all()), name
        assert float((got[name] == tensor).double().mean()) > 0.5, name


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_fused_merge_equals_numpy_reference(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path, alpha: float
) -> None:
    t = llama_triple
    merge(
        str(t.base),
        str(t.instruct),
        str(t.new_base),
        tmp_path / "m",
        alpha=alpha,
        store=store_dir,
        no_cache=True,
    )
    got = load_dir(tmp_path / "m")
    i, b, n = load_dir(t.instruct), load_dir(t.base), load_dir(t.new_base)
    assert got.keys() == n.keys()
    for name in n:
        want = exact_merge(i[name], b[name], n[name], alpha)
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name
    assert list(store_dir.glob("residuals/*")) == []  # --no-cache stores nothing


def test_cached_fp32_path_equals_fused(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    # bf16 weights: instruct - base is exact in fp32, so both paths round the same value once
    t = llama_triple
    merge(
        str(t.base),
        str(t.instruct),
        str(t.new_base),
        tmp_path / "fused",
        alpha=0.5,
        store=store_dir,
        no_cache=True,
    )
    merge(
        str(t.base),
        str(t.instruct),
        str(t.new_base),
        tmp_path / "cached",
        alpha=0.5,
        store=store_dir,
        dtype="float32",
    )
    fused, cached = load_dir(tmp_path / "fused"), load_dir(tmp_path / "cached")
    assert all(torch.equal(fused[k], cached[k]) for k in fused)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_fp32_models_are_correctly_rounded(
    llama_triple_fp32: TinyTriple, store_dir: Path, tmp_path: Path, alpha: float
) -> None:
    # fp32 weights: instruct - base is often inexact in fp32; the result is still the
    # exact value rounded once, on the fused and on the cached path (fp32 residual).
    t = llama_triple_fp32
    i, b, n = load_dir(t.instruct), load_dir(t.base), load_dir(t.new_base)
    merge(
        str(t.base),
        str(t.instruct),
        str(t.new_base),
        tmp_path / "f",
        alpha=alpha,
        store=store_dir,
        no_cache=True,
    )
    res = compute(str(t.base), str(t.instruct), dtype="float32", store=store_dir)
    apply(res.key, str(t.new_base), tmp_path / "c", alpha=alpha, store=store_dir)
    r = load_dir(res.path)
    fused, cached = load_dir(tmp_path / "f"), load_dir(tmp_path / "c")
    for name in n:
        assert fused[name].dtype == torch.float32  # the target's dtype
        assert torch.equal(fused[name], exact_merge(i[name], b[name], n[name], alpha)), name
        assert torch.equal(r[name], (i[name].double() - b[name].double()).float()), name
        want = exact_merge(None, None, n[name], alpha, residual=r[name])
        assert torch.equal(cached[name], want), name


def test_merged_model_loads_generates_and_speaks_like_instruct(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    out = tmp_path / "merged"
    merge(str(t.base), str(t.instruct), str(t.new_base), out, store=store_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|start_header_id|>" in prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in gen_cfg["eos_token_id"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    card = (out / "README.md").read_text()
    assert str(t.new_base) in card and "alpha = 1.0" in card
    prov = json.loads((out / "realign.json").read_text())
    assert prov["residual_key"] and prov["target"]["digest"]


def test_extra_instruct_vocabulary_is_appended_not_truncated(
    llama_triple_extra_vocab: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple_extra_vocab
    res = compute(str(t.base), str(t.instruct), dtype="float32", store=store_dir)
    assert res.manifest.vocab is not None
    rows_b, rows_i = res.manifest.vocab.base_rows, res.manifest.vocab.instruct_rows
    assert rows_i == rows_b + 3
    out = tmp_path / "m"
    apply(res.key, str(t.new_base), out, alpha=0.5, store=store_dir)
    got, ins = load_dir(out), load_dir(t.instruct)
    emb = "model.embed_tokens.weight"
    assert got[emb].shape[0] == rows_i
    assert torch.equal(got[emb][rows_b:], ins[emb][rows_b:])  # new rows verbatim, not scaled
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows_i
    AutoModelForCausalLM.from_pretrained(out)  # shapes agree with the config


def test_tied_embeddings(llama_triple_tied: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    t = llama_triple_tied
    out = tmp_path / "m"
    merge(str(t.base), str(t.instruct), str(t.new_base), out, store=store_dir)
    assert "lm_head.weight" not in load_dir(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen2_family_with_biases(qwen_triple: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    t = qwen_triple
    out = tmp_path / "m"
    merge(str(t.base), str(t.instruct), str(t.new_base), out, store=store_dir, no_cache=True)
    got = load_dir(out)
    assert any(name.endswith("q_proj.bias") for name in got)
    AutoModelForCausalLM.from_pretrained(out)


def test_small_chunks_give_identical_bytes(llama_triple: TinyTriple, tmp_path: Path) -> None:
    from app.residuals.apply import merge_fused
    from app.residuals.checkpoint import Checkpoint
    from app.residuals.hashing import FileHasher
    from app.residuals.sources import RunOptions, local_source

    t, hasher = llama_triple, FileHasher()
    ckpts = [Checkpoint.open(p) for p in (t.instruct, t.base, t.new_base)]
    srcs = tuple(local_source(p, hasher) for p in (t.instruct, t.base, t.new_base))
    for name, chunk in (("big", 8 * 1024 * 1024), ("small", 1000)):
        (tmp_path / name).mkdir()
        merge_fused(
            *ckpts,
            tmp_path / name,
            sources=srcs,  # type: ignore[arg-type]
            opts=RunOptions(chunk_elems=chunk, max_shard_bytes=1_000_000),
        )
    big, small = load_dir(tmp_path / "big"), load_dir(tmp_path / "small")
    assert len(list((tmp_path / "small").glob("*.safetensors"))) > 1
    assert all(torch.equal(big[k], small[k]) for k in big)
