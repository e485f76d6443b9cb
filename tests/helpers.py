"""Small readers used by several test modules (real safetensors files, no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory or residual pack."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_tensor(model: Path, name: str, tensor: torch.Tensor) -> None:
    """Replace one tensor in whichever shard holds it (shape may change)."""
    for f in sorted(model.glob("*.safetensors")):
        tensors = load_file(f)
        if name in tensors:
            tensors[name] = tensor
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise KeyError(name)


def edit_config(model: Path, **changes: object) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def tree(path: Path) -> list[str]:
    """Sorted relative paths of everything under ``path`` (for 'nothing changed' checks)."""
    if not path.exists():
        return []
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def stored(store: Path) -> list[str]:
    """What a reader of the store could find: artifacts and leftovers of unfinished work."""
    return [f"{sub}/{p}" for sub in ("residuals", "merged", ".staging") for p in tree(store / sub)]
