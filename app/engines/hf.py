"""TorchEngine: transformers on the CPU — the embedded default, no vLLM needed.

Generation runs in a worker thread token by token with a KV cache and is streamed
to the event loop; a reader/writer lock keeps weight swaps from ever interleaving
with a generation step.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import torch

from app.core.errors import IncompatibleModelsError
from app.engines.base import GenerationChunk, GenerationRequest, InlineMerge
from app.engines.rwlock import RWLock
from app.engines.sizing import EngineMemory, context_length


def architecture_of(model_dir: Path) -> str:
    """``architectures[0]`` of a model directory's config."""
    config = json.loads((model_dir / "config.json").read_text())
    return str((config.get("architectures") or ["unknown"])[0])


class TorchEngine:
    """A transformers model on the CPU (or one CUDA device) behind the engine protocol.

    Args:
        model_dir: the checkpoint to load.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: ``auto`` (the checkpoint's) or a torch dtype name.
        max_model_len: context length; ``None`` = the model's own limit.

    Raises:
        ContextLengthSettingError: ``max_model_len`` is above the model's limit.
    """

    kind = "torch"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_model_len: int | None = None,
        memory: EngineMemory | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.architecture = architecture_of(model_dir)
        self.max_model_len = context_length(model_dir, max_model_len)
        self.device = device
        self.dtype = dtype
        self.scratch_bytes = (memory or EngineMemory()).inline_scratch_mb << 20
        self.model: Any = None
        self.eos_ids: set[int] = set()
        self._lock = RWLock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        # Like vLLM: stop at the end-of-sequence ids of the model it started with.
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    async def close(self) -> None:
        async with self._lock.write():
            self.model = None

    # -- weights --------------------------------------------------------------------------
    async def reload(self, model_dir: Path) -> None:
        from safetensors.torch import load_file

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for f in sorted(model_dir.glob("*.safetensors")):
                yield from load_file(f).items()

        self._check(model_dir)
        async with self._lock.write():
            await asyncio.to_thread(self._assign, tensors())
            self.model_dir = model_dir

    async def reload_merged(self, merge: InlineMerge) -> None:
        from app.residuals.inline import stream_merged
        from app.residuals.manifest import read_residual_manifest

        self._check(merge.target_dir)
        if read_residual_manifest(merge.residual_dir).vocab is not None:
            raise IncompatibleModelsError(
                "the residual adds vocabulary rows, so the merged shapes differ from the "
                "loaded model's; start a new engine on the written merge"
            )
        async with self._lock.write():
            stream = stream_merged(
                merge.residual_dir,
                merge.target_dir,
                merge.alpha,
                self.device,
                scratch_bytes=self.scratch_bytes,
            )
            await asyncio.to_thread(self._assign, stream)

    def _check(self, model_dir: Path) -> None:
        """Refuse, from headers alone, weights that cannot replace the loaded ones in place."""
        from app.residuals.checkpoint import Checkpoint

        arch = architecture_of(model_dir)
        if arch != self.architecture:
            raise IncompatibleModelsError(
                f"{model_dir}: {arch} cannot replace the loaded "
                f"{self.architecture} in place; start a new engine"
            )
        want = {n: tuple(t.shape) for n, t in self.model.state_dict().items()}
        if self.model.config.tie_word_embeddings:
            want.pop("lm_head.weight", None)
        with Checkpoint.open(model_dir) as ckpt:
            have = {n: i.shape for n, i in ckpt.tensors.items()}
        for name, shape in want.items():
            if have.get(name) != shape:
                got = have.get(name, "nothing")
                raise IncompatibleModelsError(
                    f"{model_dir}: {name} is {got}, the loaded model "
                    f"has {shape}; start a new engine"
                )

    def _assign(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        seen = set()
        with torch.no_grad():
            for name, tensor in weights:
                target = params.get(name)
                if target is None or target.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: not a parameter of the loaded "
                        f"{self.architecture} with this shape; start a new engine"
                    )
                target.copy_(tensor)
                seen.add(name)
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()

    async def checksum(self, names: list[str]) -> dict[str, float]:
        async with self._lock.read():
            params = dict(self.model.named_parameters())
            return {n: float(params[n].detach().double().sum()) for n in names if n in params}

    # -- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: GenerationChunk | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async with self._lock.read():
            worker = asyncio.create_task(asyncio.to_thread(self._run, request, emit, stop))
            try:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                stop.set()
                await worker

    async def probe(self, token_ids: list[int]) -> list[int]:
        out: list[int] = []
        async for chunk in self.generate(
            GenerationRequest(token_ids, max_tokens=4, temperature=0.0)
        ):
            out += chunk.token_ids
        return out

    def _run(self, req: GenerationRequest, emit: Any, stop: threading.Event) -> None:
        try:
            for index in range(req.n):
                seed = None if req.seed is None else req.seed + index
                self._one(req, index, seed, emit, stop)
        except BaseException as exc:
            emit(exc)
        finally:
            emit(None)

    @torch.inference_mode()
    def _one(
        self, req: GenerationRequest, index: int, seed: int | None, emit: Any, stop: threading.Event
    ) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
        ids = torch.tensor([req.prompt_token_ids], device=self.device)
        past = None
        for step in range(req.max_tokens):
            if stop.is_set():
                return
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = _sample(out.logits[0, -1].float(), req.temperature, req.top_p, gen)
            ids = torch.tensor([[token]], device=self.device)
            if token in req.stop_token_ids or token in self.eos_ids:
                emit(GenerationChunk(index, [token], "stop"))
                return
            last = step == req.max_tokens - 1
            emit(GenerationChunk(index, [token], "length" if last else None))
        if req.max_tokens == 0:
            emit(GenerationChunk(index, [], "length"))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    # Shift first: a tiny temperature then sends the others to -inf, never the max to
    # +inf (inf - inf would make softmax NaN and fail the request mid-stream).
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
