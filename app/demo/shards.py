"""Safetensors weight files laid out as on the Hub: one file, or shards plus an index."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAFE_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read all safetensors weights of a checkpoint directory, sharded or not.

    Args:
        path: Checkpoint directory.

    Returns:
        Tensor name to tensor.

    Raises:
        FileNotFoundError: If the directory holds no safetensors weights.
    """
    index = path / SAFE_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {SAFE_INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(path / file))
    return tensors


def _split(sizes: dict[str, int], shards: int) -> list[list[str]]:
    # Contiguous groups of about equal bytes, never empty, in the given order.
    names = list(sizes)
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    filled = 0
    for i, name in enumerate(names):
        groups_left = shards - len(groups)
        must_open = len(names) - i <= groups_left
        if groups[-1] and groups_left and (filled * shards >= total * len(groups) or must_open):
            groups.append([])
        groups[-1].append(name)
        filled += sizes[name]
    return groups


def save_weights(path: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1) -> list[Path]:
    """Write tensors as safetensors, sharded with a Hugging Face index when `shards > 1`.

    Args:
        path: Checkpoint directory (must exist).
        tensors: Tensor name to tensor; the order decides which shard holds what.
        shards: Number of files.

    Returns:
        The weight files written.

    Raises:
        ValueError: If `shards` is below 1 or above the number of tensors.
    """
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"shards={shards}: must be between 1 and {len(tensors)} (tensor count)")
    if shards == 1:
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
        return [path / SINGLE_FILE]
    groups = _split({name: t.nbytes for name, t in tensors.items()}, shards)
    weight_map: dict[str, str] = {}
    files: list[Path] = []
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
        files.append(path / file)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files
