"""Bad inputs: each gives a precise error, before heavy IO, and leaves the store unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from app.core.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    InvalidRefError,
    ModelNotFoundError,
    OutputExistsError,
    OutputNotWritableError,
    RemoteCodeError,
    UnsafeCheckpointError,
)
from app.demo.tiny import TinyTriple, write_pickle_only
from app.merge import compute, merge
from app.residuals.assets import copy_assets, merged_config
from app.residuals.refs import ModelRef, refuse_pickle_only
from app.residuals.remote_code import check_remote_code, find_code
from tests.helpers import copy_model, edit_config, rewrite_tensor, stored, tree


def _merge(t: TinyTriple, store: Path, out: Path, **kw: object) -> None:
    merge(str(t.base), str(t.instruct), str(t.new_base), out, store=store, **kw)  # type: ignore[arg-type]


def test_cross_family_is_refused_naming_fields(
    llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    before = stored(store_dir)
    with pytest.raises(IncompatibleModelsError) as exc:
        merge(
            str(llama_triple.base),
            str(qwen_triple.instruct),
            str(llama_triple.new_base),
            tmp_path / "out",
            store=store_dir,
        )
    assert "model_type 'qwen2' vs 'llama'" in str(exc.value)
    assert "Qwen2ForCausalLM" in str(exc.value)
    assert stored(store_dir) == before and not (tmp_path / "out").exists()


def test_target_of_another_family_is_refused(
    llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(IncompatibleModelsError, match="base and target"):
        merge(
            str(llama_triple.base),
            str(llama_triple.instruct),
            str(qwen_triple.new_base),
            tmp_path / "out",
            store=store_dir,
        )
    assert tree(store_dir / "residuals") == []  # refused before the residual was computed


def test_shape_mismatch_names_tensor_and_shapes(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensor(bad, name, torch.zeros(512, 320, dtype=torch.bfloat16))
    with pytest.raises(IncompatibleModelsError) as exc:
        compute(str(llama_triple.base), str(bad), store=store_dir)
    assert f"{name}: base (512, 256) vs instruct (512, 320)" in str(exc.value)


def test_fewer_instruct_vocab_rows_is_never_truncated(
    llama_triple_extra_vocab: TinyTriple, store_dir: Path
) -> None:
    t = llama_triple_extra_vocab  # swap roles: the "instruct" now has fewer rows
    with pytest.raises(IncompatibleModelsError, match=r"never truncates.*|fewer vocabulary rows"):
        compute(str(t.instruct), str(t.base), store=store_dir)


def test_missing_tensor_is_named(llama_triple: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    (bad / "model.safetensors.index.json").unlink()
    shard = sorted(bad.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError, match=f"base has {dropped}"):
        compute(str(llama_triple.base), str(bad), store=store_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "short"])
def test_corrupt_safetensors(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path, damage: str
) -> None:
    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        shard.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        shard.write_bytes(data[:5])
    before = stored(store_dir)
    with pytest.raises(CorruptCheckpointError) as exc:
        compute(str(llama_triple.base), str(bad), store=store_dir)
    assert shard.name in str(exc.value) and "re-download" in str(exc.value)
    assert stored(store_dir) == before


@pytest.mark.parametrize("text", ["[]", "null", '"llama"', "\xff"])
def test_config_that_is_not_an_object(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path, text: str
) -> None:
    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    (bad / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match=r"config\.json") as exc:
        compute(str(llama_triple.base), str(bad), store=store_dir)
    assert str(bad) in str(exc.value)
    assert stored(store_dir) == []


def test_missing_config_and_missing_shard(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    no_cfg = copy_model(llama_triple.instruct, tmp_path / "nocfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        compute(str(llama_triple.base), str(no_cfg), store=store_dir)
    no_shard = copy_model(llama_triple.instruct, tmp_path / "noshard")
    sorted(no_shard.glob("*.safetensors"))[1].unlink()
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        compute(str(llama_triple.base), str(no_shard), store=store_dir)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        compute(str(llama_triple.base), str(tmp_path / "nowhere"), store=store_dir)


def test_pickle_only_checkpoint_is_refused(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    pkl = write_pickle_only(tmp_path / "pkl", chat=True)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*arbitrary code"):
        compute(str(llama_triple.base), str(pkl), store=store_dir)
    with pytest.raises(UnsafeCheckpointError):
        refuse_pickle_only(["config.json", "pytorch_model.bin"], "hf:org/model@main")
    refuse_pickle_only(["model.safetensors", "pytorch_model.bin"], "hf:org/model@main")


def test_tokenizer_disagreement_is_refused(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    import json

    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    data = json.loads((bad / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelsError, match=r"tokenizers differ: token id 10[01]"):
        compute(str(llama_triple.base), str(bad), store=store_dir)


def test_config_structure_mismatch(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    bad = copy_model(llama_triple.instruct, tmp_path / "bad")
    edit_config(bad, num_hidden_layers=3)
    with pytest.raises(IncompatibleModelsError, match="num_hidden_layers 3 vs 2"):
        compute(str(llama_triple.base), str(bad), store=store_dir)


def test_output_exists_or_unwritable(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _merge(llama_triple, store_dir, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputNotWritableError, match="not a directory"):
        _merge(llama_triple, store_dir, a_file / "out")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputNotWritableError):
            _merge(llama_triple, store_dir, ro / "out")
    assert tree(store_dir / "residuals") == []


def test_ref_parsing() -> None:
    ref = ModelRef.parse("hf:meta-llama/Meta-Llama-3-8B@a1b2c3")
    assert (ref.kind, ref.repo, ref.revision) == ("hf", "meta-llama/Meta-Llama-3-8B", "a1b2c3")
    assert ModelRef.parse("hf:Qwen/Qwen2-7B").revision == "main"
    assert ModelRef.parse("~/models/x").kind == "local"
    s3 = ModelRef.parse("s3://bucket/models/llama/")
    assert (s3.kind, s3.repo, s3.revision, str(s3)) == (
        "s3",
        "bucket/models/llama",
        None,
        "s3://bucket/models/llama",
    )
    pinned = ModelRef.parse("s3://bucket/m@sha256:" + "a" * 64)
    assert pinned.revision == "sha256:" + "a" * 64
    bad_refs = ["", "hf:noslash", "hf:a/b@bad rev", "gs://bucket/model", "s3://bucket",
                "s3://B_ad/model", "s3://bucket/m@main"]  # fmt: skip
    for bad in bad_refs:
        with pytest.raises(InvalidRefError):
            ModelRef.parse(bad)


def test_code_hash_follows_its_documented_definition(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    model = copy_model(llama_triple.instruct, tmp_path / "m")
    auto_map = {"AutoModel": "modeling_x.X", "AutoConfig": "configuration_x.XConfig"}
    edit_config(model, auto_map=auto_map)
    (model / "sub").mkdir()
    (model / "sub" / "modeling_x.py").write_bytes(b"class X: ...\n")
    code = find_code(model)
    assert code is not None and code.files == ["sub/modeling_x.py"]
    lines = sorted(
        [
            "auto_map config.json " + json.dumps(auto_map, sort_keys=True, separators=(",", ":")),
            "file sub/modeling_x.py " + hashlib.sha256(b"class X: ...\n").hexdigest(),
        ]
    )
    assert code.digest == hashlib.sha256("".join(f"{x}\n" for x in lines).encode()).hexdigest()
    with pytest.raises(RemoteCodeError, match=code.digest):
        check_remote_code(model, "m")
    check_remote_code(model, "m", trusted=[code.digest.upper()])  # allowed: no error
    assert find_code(llama_triple.instruct) is None


def test_outputs_drop_auto_map(llama_triple: TinyTriple, tmp_path: Path) -> None:
    src = copy_model(llama_triple.instruct, tmp_path / "src")
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tok_x.T", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(tok))
    copy_assets(src, tmp_path / "dest")
    copied = json.loads((tmp_path / "dest" / "tokenizer_config.json").read_text())
    assert "auto_map" not in copied and copied == {k: v for k, v in tok.items() if k != "auto_map"}
    assert (tmp_path / "dest" / "tokenizer.json").read_bytes() == (
        src / "tokenizer.json"
    ).read_bytes()
    assert "auto_map" not in merged_config({"auto_map": {"AutoModel": "x.X"}, "a": 1}, {}, None)
