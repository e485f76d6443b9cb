"""Tiny but real Llama / Qwen2 checkpoints, written the way the Hub lays them out.

The directories load with `transformers` and vLLM, yet weigh a few MB, so tests,
the demo command and benchmarks can run the whole residual workflow offline:
base -> instruct (base + small delta, chat template, optional extra tokens) and a
drifted new base.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig

from app.demo.architecture import Family, build_config, build_generation_config, tensor_shapes
from app.demo.shards import SINGLE_FILE, read_weights, save_weights
from app.demo.tokenizer import write_tokenizer

__all__ = [
    "Family",
    "TinyTriple",
    "build_config",
    "fresh_weights",
    "make_triple",
    "perturbed_weights",
    "read_weights",
    "save_weights",
    "tensor_shapes",
    "write_model",
    "write_pickle_only",
    "write_tokenizer",
]

INIT_STD = 0.02
PICKLE_FILE = "pytorch_model.bin"
# Rows of these tensors follow the vocabulary, so an instruct model may have more.
_VOCAB_TENSORS = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


@dataclass(frozen=True)
class TinyTriple:
    """The three checkpoints of one residual scenario."""

    base: Path
    instruct: Path
    new_base: Path


def _init_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    # Mirrors transformers' own init: RMSNorm scales start at one, biases at zero.
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * INIT_STD


def fresh_weights(
    config: PretrainedConfig, *, seed: int, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Initialise every tensor of `config` from a seeded generator.

    Args:
        config: A causal-LM config.
        seed: Seed of the `torch.Generator`; equal seeds give equal weights.
        dtype: Dtype of the returned tensors.

    Returns:
        Tensor name to tensor, in `save_pretrained` order.
    """
    generator = torch.Generator().manual_seed(seed)
    return {
        name: _init_tensor(name, shape, generator).to(dtype)
        for name, shape in tensor_shapes(config).items()
    }


def _perturb(
    name: str, old: torch.Tensor, shape: torch.Size, scale: float, generator: torch.Generator
) -> torch.Tensor:
    grown = shape[0] - old.shape[0]
    if old.shape[1:] != shape[1:] or grown < 0 or (grown and name not in _VOCAB_TENSORS):
        raise ValueError(
            f"{name}: source {tuple(old.shape)} vs target {tuple(shape)} - only the "
            "vocabulary rows of the embedding or lm_head may grow"
        )
    moved = old.float() + scale * torch.randn(old.shape, generator=generator)
    if not grown:
        return moved
    # New tokens get fresh rows, as when instruct tuning adds special tokens.
    new_rows = torch.randn((grown, *shape[1:]), generator=generator) * INIT_STD
    return torch.cat([moved, new_rows])


def perturbed_weights(
    like: Path,
    config: PretrainedConfig,
    *,
    seed: int,
    delta_scale: float,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's weights and move each by seeded Gaussian noise.

    Args:
        like: Checkpoint directory to start from.
        config: Target config; may have more vocabulary rows than `like`.
        seed: Seed of the noise generator.
        delta_scale: Standard deviation of the noise added to every tensor.
        dtype: Dtype of the returned tensors.

    Returns:
        Tensor name to tensor, in `save_pretrained` order.

    Raises:
        ValueError: If the tensor names differ or a shape change is not a vocabulary growth.
    """
    source = read_weights(like)
    shapes = tensor_shapes(config)
    if set(source) != set(shapes):
        diff = sorted(set(source).symmetric_difference(shapes))
        raise ValueError(
            f"{like}: tensor names differ from the target config ({diff[:4]}...); "
            "use the same family and tie_word_embeddings"
        )
    generator = torch.Generator().manual_seed(seed)
    return {
        name: _perturb(name, source[name], shape, delta_scale, generator).to(dtype)
        for name, shape in shapes.items()
    }


def write_model(
    path: Path,
    *,
    family: Family = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    tie_word_embeddings: bool = False,
    chat: bool = False,
    extra_tokens: Sequence[str] = (),
    like: Path | None = None,
    delta_scale: float = 0.0,
) -> Path:
    """Write a complete tiny checkpoint: config, generation config, tokenizer, weights.

    Args:
        path: Directory to create; it must not exist or be empty.
        family: Architecture family, `"llama"` or `"qwen2"`.
        seed: Seed of the weights (fresh) or of the noise (with `like`).
        dtype: Dtype of the saved weights.
        shards: Number of safetensors files; above 1 an index is written.
        tie_word_embeddings: Share the input embedding with the output head.
        chat: Instruct flavour: chat template, `<|eot_id|>` as end of turn.
        extra_tokens: Special tokens added after the Llama 3 ones (more vocabulary rows).
        like: Start from this checkpoint's weights instead of a fresh init.
        delta_scale: Standard deviation of the noise added to `like`'s weights.

    Returns:
        `path`.

    Raises:
        FileExistsError: If `path` already has content.
        ValueError: If `like` does not fit the requested architecture.
    """
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: not empty; pick a new directory for the checkpoint")
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path, chat=chat, extra_tokens=extra_tokens)
    config = build_config(
        family,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        chat=chat,
        dtype=dtype,
    )
    config.save_pretrained(path)
    build_generation_config(chat).save_pretrained(path)
    if like is None:
        tensors = fresh_weights(config, seed=seed, dtype=dtype)
    else:
        tensors = perturbed_weights(like, config, seed=seed, delta_scale=delta_scale, dtype=dtype)
    save_weights(path, tensors, shards=shards)
    return path


def make_triple(
    root: Path,
    *,
    family: Family = "llama",
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    tie_word_embeddings: bool = False,
    extra_instruct_tokens: int = 0,
    seed: int = 0,
) -> TinyTriple:
    """Write base, instruct (base + delta, chat) and new base (base + other delta).

    Args:
        root: Parent directory; gets `base/`, `instruct/` and `new_base/`.
        family: Architecture family, `"llama"` or `"qwen2"`.
        dtype: Dtype of the saved weights.
        shards: Number of safetensors files per checkpoint.
        tie_word_embeddings: Share the input embedding with the output head.
        extra_instruct_tokens: Number of `<|extra_i|>` tokens only the instruct side has.
        seed: Base seed; the two deltas use `seed + 1` and `seed + 2`.

    Returns:
        The three checkpoint directories.
    """
    write = functools.partial(
        write_model,
        family=family,
        dtype=dtype,
        shards=shards,
        tie_word_embeddings=tie_word_embeddings,
    )
    base = write(root / "base", seed=seed)
    extra = [f"<|extra_{i}|>" for i in range(extra_instruct_tokens)]
    instruct = write(
        root / "instruct", seed=seed + 1, chat=True, extra_tokens=extra, like=base, delta_scale=0.01
    )
    new_base = write(root / "new_base", seed=seed + 2, like=base, delta_scale=0.01)
    return TinyTriple(base=base, instruct=instruct, new_base=new_base)


def write_pickle_only(
    path: Path,
    *,
    family: Family = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    chat: bool = False,
) -> Path:
    """Write a tiny checkpoint whose weights exist only as a pickled `pytorch_model.bin`.

    Such checkpoints can run code when loaded, so Realign must refuse them; this
    builds the case for that test.

    Args:
        path: Directory to create; it must not exist or be empty.
        family: Architecture family, `"llama"` or `"qwen2"`.
        seed: Seed of the weights.
        dtype: Dtype of the saved weights.
        chat: Instruct flavour (chat template).

    Returns:
        `path`.
    """
    write_model(path, family=family, seed=seed, dtype=dtype, chat=chat)
    weights = path / SINGLE_FILE
    torch.save(load_file(weights), path / PICKLE_FILE)
    weights.unlink()
    return path
