"""Configs of the tiny checkpoints and the tensor names they imply."""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from app.demo.tokenizer import BEGIN_OF_TEXT, END_OF_TEXT, EOT, special_token_ids

Family = Literal["llama", "qwen2"]

# head_dim is 64 (256 / 4) because vLLM's CPU attention backend supports no smaller size.
_SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def build_config(
    family: Family,
    *,
    vocab_size: int,
    tie_word_embeddings: bool = False,
    chat: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> PretrainedConfig:
    """Build the model config of a tiny checkpoint.

    Args:
        family: Architecture family, `"llama"` or `"qwen2"`.
        vocab_size: Embedding rows; equals the tokenizer length.
        tie_word_embeddings: Share the input embedding with the output head.
        chat: Instruct flavour: generation also stops at `<|eot_id|>`.
        dtype: Dtype recorded in `config.json`.

    Returns:
        A `LlamaConfig` or `Qwen2Config`.

    Raises:
        ValueError: If `family` is unknown.
    """
    ids = special_token_ids()
    eos: int | list[int] = [ids[END_OF_TEXT], ids[EOT]] if chat else ids[END_OF_TEXT]
    common: dict[str, Any] = {
        **_SHAPE,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": ids[BEGIN_OF_TEXT],
        "eos_token_id": eos,
        "dtype": dtype,
    }
    if family == "llama":
        config: PretrainedConfig = LlamaConfig(**common, head_dim=64, rms_norm_eps=1e-5)
        config.architectures = ["LlamaForCausalLM"]
    elif family == "qwen2":
        config = Qwen2Config(**common, rms_norm_eps=1e-6, use_sliding_window=False)
        config.architectures = ["Qwen2ForCausalLM"]
    else:
        raise ValueError(f"unknown family {family!r}: use 'llama' or 'qwen2'")
    return config


def tensor_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    """List the tensors `save_pretrained` would write for `config`, in its order.

    The model is built on the meta device, so no memory is allocated; tied
    parameters appear once, under their first name, as in saved checkpoints.

    Args:
        config: A causal-LM config.

    Returns:
        Tensor name to shape.
    """
    with torch.device("meta"):
        # transformers ships from_config without annotations.
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    seen: set[int] = set()
    shapes: dict[str, torch.Size] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tensor.shape
    return shapes


def build_generation_config(chat: bool) -> GenerationConfig:
    """Build the generation config: instruct models also stop at `<|eot_id|>`, as Llama 3's do.

    Args:
        chat: Instruct flavour.

    Returns:
        A `GenerationConfig` with the bos and eos ids.
    """
    ids = special_token_ids()
    eos: int | list[int] = [ids[END_OF_TEXT], ids[EOT]] if chat else ids[END_OF_TEXT]
    return GenerationConfig.from_dict({"bos_token_id": ids[BEGIN_OF_TEXT], "eos_token_id": eos})
