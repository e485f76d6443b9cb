"""What the engine pool loads: a model's weights named by reference, made local on demand.

A :class:`ModelSource` names the weights (``ref``: a store key, or the residual key,
target and alpha of an in-engine merge) and knows how to open them as directories on
this node (:class:`LocalModel`): a serving replica fetches them from the shared store
into its node cache and pins them there for as long as an engine holds them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.engines.base import InlineMerge

VERIFY_TENSOR = "model.norm.weight"


@dataclass(frozen=True)
class LocalModel:
    """What an engine reads for a model: directories on this node."""

    path: Path  # the merged dir, or for in-engine merges the target (config/shapes)
    inline: InlineMerge | None = None

    @property
    def assets(self) -> Path:
        """Where the tokenizer files are: the merged dir, or the residual pack's assets."""
        return self.inline.residual_dir / "assets" if self.inline else self.path


Opener = Callable[[], contextlib.AbstractContextManager[LocalModel]]


@dataclass(frozen=True)
class ModelSource:
    """What to load for a model id.

    Args:
        model_id: the served name.
        ref: which weights (equal refs = the same weights); a model id registered again
            with other weights gets another ref.
        open: makes the weights local and holds them there until the context exits (a
            store pin: node-cache eviction leaves them alone meanwhile).
    """

    model_id: str
    ref: str
    open: Opener = field(compare=False, repr=False)

    @classmethod
    def at(cls, model_id: str, path: Path, inline: InlineMerge | None = None) -> ModelSource:
        """Weights already in directories on this node (nothing to fetch or pin)."""
        local = LocalModel(path, inline)
        ref = f"{path}" if inline is None else f"{inline.residual_dir}+{path}*{inline.alpha!r}"
        return cls(model_id, ref, lambda: contextlib.nullcontext(local))


# Config fields an engine does not build anything from: tokens are the front end's.
_NOT_ENGINE = frozenset(
    {"_name_or_path", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
     "use_cache", "auto_map"}
)  # fmt: skip


def signature(model_dir: Path) -> str:
    """Models with equal signatures can swap weights in place in one engine.

    Everything else in ``config.json`` counts: an engine bakes more than shapes in at
    start (RoPE tables from ``rope_theta``/``rope_scaling``, its context length from
    ``max_position_embeddings``, norm epsilons), so Llama 3 -> 3.1 weights in a Llama 3
    engine would run with the wrong positions.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_ENGINE}, sort_keys=True)


def expected_checksum(local: LocalModel) -> float | None:
    """Sum of :data:`VERIFY_TENSOR` as the files say (None when it is not there)."""
    from app.residuals.checkpoint import Checkpoint
    from app.residuals.inline import stream_merged

    if local.inline is not None:
        i = local.inline
        for _, t in stream_merged(i.residual_dir, i.target_dir, i.alpha, names={VERIFY_TENSOR}):
            return float(t.double().sum())
        return None
    with Checkpoint.open(local.path) as ckpt:
        info = ckpt.tensors.get(VERIFY_TENSOR)
        if info is None:
            return None
        import torch

        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        ckpt.read_into(info, 0, info.rows, memoryview(buf.numpy()))  # type: ignore[arg-type]
        return float(buf.view(info.dtype.torch).double().sum())
