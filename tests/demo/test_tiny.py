"""The generated checkpoints are real: transformers loads, tokenizes and generates with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from app.demo.tiny import (
    TinyTriple,
    build_config,
    make_triple,
    read_weights,
    save_weights,
    tensor_shapes,
    write_model,
    write_pickle_only,
)
from app.demo.tokenizer import EOT, SPECIAL_TOKENS

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def _load(path: Path) -> Any:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("fixture", ["llama_triple", "qwen_triple"])
def test_instruct_loads_and_generates_greedily(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    triple: TinyTriple = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(triple.instruct)
    model = _load(triple.instruct)
    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        second = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert first.shape == (1, ids.shape[1] + 8)
    assert torch.equal(first, second)
    assert isinstance(tokenizer.decode(first[0, ids.shape[1] :]), str)


def test_chat_template_only_on_instruct(llama_triple: TinyTriple) -> None:
    instruct = AutoTokenizer.from_pretrained(llama_triple.instruct)
    base = AutoTokenizer.from_pretrained(llama_triple.base)
    text = instruct.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert f"France?{EOT}" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert instruct.eos_token == EOT and base.eos_token == "<|end_of_text|>"
    assert base.chat_template is None
    assert base.get_vocab() == instruct.get_vocab()
    assert all(t in base.get_vocab() for t in SPECIAL_TOKENS)


def test_generation_configs_stop_like_llama3(llama_triple: TinyTriple) -> None:
    vocab = AutoTokenizer.from_pretrained(llama_triple.instruct).get_vocab()
    instruct = GenerationConfig.from_pretrained(llama_triple.instruct)
    base = GenerationConfig.from_pretrained(llama_triple.base)
    assert instruct.eos_token_id == [vocab["<|end_of_text|>"], vocab[EOT]]
    assert base.eos_token_id == vocab["<|end_of_text|>"]
    assert base.bos_token_id == instruct.bos_token_id == vocab["<|begin_of_text|>"]


def test_shard_index_matches_files(llama_triple: TinyTriple) -> None:
    index = json.loads((llama_triple.base / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in llama_triple.base.glob("*.safetensors"))
    assert len(files) == 2
    total = 0
    for file in files:
        with safe_open(llama_triple.base / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                assert index["weight_map"][name] == file
                total += f.get_tensor(name).nbytes
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(
        tensor_shapes(AutoConfig.from_pretrained(llama_triple.base))
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_tensor_names_match_save_pretrained(family: str, tie: bool, tmp_path: Path) -> None:
    config = build_config(family, vocab_size=512, tie_word_embeddings=tie)  # type: ignore[arg-type]
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(tensor_shapes(config))


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = make_triple(tmp_path / "a", extra_instruct_tokens=1, seed=7)
    second = make_triple(tmp_path / "b", extra_instruct_tokens=1, seed=7)
    for a, b in zip(
        (first.base, first.instruct, first.new_base),
        (second.base, second.instruct, second.new_base),
        strict=True,
    ):
        assert _digest(a) == _digest(b)
    other = write_model(tmp_path / "c", seed=8, shards=2)
    assert _digest(other) != _digest(first.base)


def test_instruct_is_base_plus_small_delta(llama_triple: TinyTriple) -> None:
    base = read_weights(llama_triple.base)
    instruct = read_weights(llama_triple.instruct)
    new_base = read_weights(llama_triple.new_base)
    name = "model.layers.0.mlp.down_proj.weight"
    assert base[name].dtype == torch.bfloat16
    assert base[name].float().std().item() == pytest.approx(0.02, rel=0.05)
    residual = instruct[name].float() - base[name].float()
    drift = new_base[name].float() - base[name].float()
    assert residual.std().item() == pytest.approx(0.01, rel=0.05)
    assert drift.std().item() == pytest.approx(0.01, rel=0.05)
    assert not torch.equal(residual, drift)
    assert torch.all(base["model.norm.weight"] == 1)


def test_fp32_triple(llama_triple_fp32: TinyTriple) -> None:
    weights = read_weights(llama_triple_fp32.instruct)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert AutoConfig.from_pretrained(llama_triple_fp32.instruct).dtype == torch.float32


def test_extra_vocab_adds_rows(llama_triple_extra_vocab: TinyTriple) -> None:
    triple = llama_triple_extra_vocab
    base, instruct = read_weights(triple.base), read_weights(triple.instruct)
    tokenizer = AutoTokenizer.from_pretrained(triple.instruct)
    config = AutoConfig.from_pretrained(triple.instruct)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert instruct[name].shape[0] == base[name].shape[0] + 3 == config.vocab_size
    assert len(tokenizer) == config.vocab_size
    assert AutoConfig.from_pretrained(triple.base).vocab_size == base["lm_head.weight"].shape[0]
    assert tokenizer.convert_tokens_to_ids("<|extra_2|>") == config.vocab_size - 1
    rows = base["model.embed_tokens.weight"].shape[0]
    shared = instruct["model.embed_tokens.weight"][:rows].float()
    assert (shared - base["model.embed_tokens.weight"].float()).abs().max() < 0.1
    _load(triple.instruct)


def test_tied_model_has_no_lm_head(llama_triple_tied: TinyTriple) -> None:
    for path in (llama_triple_tied.base, llama_triple_tied.instruct):
        assert "lm_head.weight" not in read_weights(path)
    model = _load(llama_triple_tied.instruct)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_pickle_only_has_no_safetensors(tmp_path: Path) -> None:
    path = write_pickle_only(tmp_path / "pickled")
    assert not list(path.glob("*.safetensors"))
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(tensor_shapes(AutoConfig.from_pretrained(path)))


def test_refusals(tmp_path: Path, llama_triple: TinyTriple) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        write_model(llama_triple.base)
    with pytest.raises(ValueError, match="tensor names differ"):
        write_model(tmp_path / "q", family="qwen2", like=llama_triple.base)
    with pytest.raises(ValueError, match="shards=0"):
        save_weights(tmp_path, {"x": torch.zeros(1)}, shards=0)
