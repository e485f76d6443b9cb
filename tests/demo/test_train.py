"""The demo's trained triple: real checkpoints, the same layout as `make_triple`'s, cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.demo.tiny import TinyTriple, read_weights
from app.demo.train import RECIPE_FILE, cached_triple, make_trained_triple

# A few optimiser steps: enough to run every phase end to end, far too few to learn.
STEPS = 3


def _files(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir())


@pytest.mark.slow
def test_short_training_writes_a_cached_loadable_triple(
    tmp_path: Path, llama_triple: TinyTriple
) -> None:
    lines: list[str] = []
    triple = make_trained_triple(tmp_path / "a", steps=STEPS, progress=lines.append)

    assert [line.split(":")[0] for line in lines] == ["base", "instruct", "new_base"]
    assert _files(tmp_path / "a") == sorted(["base", "instruct", "new_base", RECIPE_FILE])
    for trained, generated in zip(
        (triple.base, triple.instruct, triple.new_base),
        (llama_triple.base, llama_triple.instruct, llama_triple.new_base),
        strict=True,
    ):
        assert _files(trained) == _files(generated)
        model, info = AutoModelForCausalLM.from_pretrained(trained, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(triple.instruct).chat_template
    assert not AutoTokenizer.from_pretrained(triple.base).chat_template

    # The children really start from the base and move away from it.
    base, instruct = read_weights(triple.base), read_weights(triple.instruct)
    assert base.keys() == instruct.keys()
    assert any(not torch.equal(base[name], instruct[name]) for name in base)

    assert cached_triple(tmp_path / "a", steps=STEPS) == triple
    assert cached_triple(tmp_path / "a", steps=STEPS + 1) is None
    with pytest.raises(FileExistsError, match="not empty"):
        make_trained_triple(tmp_path / "a", steps=STEPS)

    # Seeded and single-process: a second run gives the same weights.
    again = make_trained_triple(tmp_path / "b", steps=STEPS)
    for first, second in zip(
        (triple.base, triple.instruct, triple.new_base),
        (again.base, again.instruct, again.new_base),
        strict=True,
    ):
        one, two = read_weights(first), read_weights(second)
        assert all(torch.equal(one[name], two[name]) for name in one)
