"""Small readers used by several test modules (real safetensors files, no mocks)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from app.residuals.apply import open_pack
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.framed import FRAMES_INDEX, NEG
from app.residuals.lossy import FORMATS
from app.residuals.progress import Progress


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory or residual pack (an exact pack's residuals as
    ``p - neg`` in float32, a lossy pack's as decoded, in float32)."""
    out: dict[str, torch.Tensor] = {}
    if _lossy(path):  # decoded by the pack reader: the fp32 R it hands the merges
        _, pack = open_pack(path)
        with pack:
            return {n: _read_all(pack, i) for n, i in pack.tensors.items()}
    if (path / FRAMES_INDEX).is_file():
        _, pack = open_pack(path)
        with pack:
            for name, info in pack.tensors.items():
                if name.endswith(NEG):
                    continue
                p, neg = (_read_all(pack, i) for i in (info, pack.tensors[name + NEG]))
                out[name] = p.float() - neg.float()
        return out
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _lossy(path: Path) -> bool:
    manifest = path / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["dtype"] in FORMATS


def _read_all(ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    ckpt.read_into(info, 0, info.rows, memoryview(buf.numpy()))
    return buf.view(info.dtype.torch).reshape(info.shape)


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
    """Sorted relative paths of everything under ``path`` (for 'nothing changed' checks).

    Tolerates entries that a running process removes while the walk is under way (a
    writability probe, a staging directory being cleaned up): those are left out."""
    found: list[str] = []
    for root, dirs, files in os.walk(path):  # os.walk skips directories that vanish
        rel = Path(root).relative_to(path)
        found.extend((rel / name).as_posix() for name in (*dirs, *files))
    return sorted(found)


def start_together(procs: Sequence[subprocess.Popen[str]], go: Path) -> None:
    """Wait until each of ``procs`` printed "ready" (imported, now waiting for ``go`` to
    exist), then create ``go``: they start their work together. ``go`` is created even
    when one of them failed, so none is left waiting."""
    try:
        for p in procs:
            assert p.stdout is not None
            while (line := p.stdout.readline()) and line != "ready\n":
                pass  # anything printed on import
            assert line, p.communicate(timeout=60)[1]
    finally:
        go.touch()


def stored(store: Path) -> list[str]:
    """What a reader of the store could find: artifacts and leftovers of unfinished work."""
    return [f"{sub}/{p}" for sub in ("residuals", "merged", ".staging") for p in tree(store / sub)]


_FORMATS = {torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}


def card_without_time(card: str | bytes) -> str:
    """A model card (README.md) without the minute it was made at: two merges of the same
    inputs write the same card but for that line."""
    text = card.decode() if isinstance(card, bytes) else card
    return re.sub(r" on \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\.", " on <time>.", text)


def round_fraction(value: Fraction, dtype: torch.dtype) -> float:
    """An exact rational rounded once, to nearest-even, to ``dtype`` (as a float)."""
    p, emin = _FORMATS[dtype]
    if value == 0:
        return 0.0
    mag = abs(value)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    e = e - 1 if Fraction(2) ** e > mag else e
    quantum = Fraction(2) ** (max(e, emin) - p + 1)
    rounded = round(mag / quantum) * quantum  # round() of a Fraction: ties to even
    top = torch.finfo(dtype).max
    out = float("inf") if rounded > top else float(rounded)
    return -out if value < 0 else out


def exact_merge(
    instruct: torch.Tensor | None,
    base: torch.Tensor | None,
    target: torch.Tensor,
    alpha: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``target + a * (instruct - base)`` (or ``target + a * residual``), ``a`` = alpha in
    fp32, computed exactly and rounded once, to nearest-even, to the target's dtype —
    independently of the engine's code: float64 where it is provably exact, exact
    rationals for the other elements."""
    import numpy as np

    a = float(np.float32(alpha))
    ok = torch.ones(target.shape, dtype=torch.bool)

    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = x + y
        bb = s - x
        ok.logical_and_(((x - (s - bb)) + (y - bb)) == 0)
        return s

    if residual is not None:
        d = residual.double()
    else:
        assert instruct is not None and base is not None
        d = add(instruct.double(), -base.double())
    dh = d.float().double()
    x = add(add(target.double(), a * dh), a * (d - dh))
    if target.dtype == torch.float32:
        out = x.float()
    elif target.dtype == torch.float16:
        out = torch.from_numpy(x.numpy().astype(np.float16))  # numpy rounds float64 once
    else:
        bits = x.view(torch.int64)
        bits = (bits + ((1 << 44) - 1) + ((bits >> 45) & 1)) & -(1 << 45)
        out = bits.view(torch.float64).float().bfloat16()  # both casts now exact
    flat, ok_flat = out.view(-1), ok.view(-1)
    for k in torch.nonzero(~ok_flat).flatten().tolist():
        if residual is not None:
            d_k = Fraction(float(residual.view(-1)[k]))
        else:
            d_k = Fraction(float(instruct.view(-1)[k])) - Fraction(float(base.view(-1)[k]))  # type: ignore[union-attr]
        value = Fraction(float(target.view(-1)[k])) + Fraction(a) * d_k
        flat[k] = round_fraction(value, target.dtype)
    return out


def cancel_after(tensors: int) -> tuple[threading.Event, Callable[[Progress], None]]:
    """A cancel flag and a progress callback that sets it once ``tensors`` are done."""
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.tensors_done >= tensors:
            cancel.set()

    return cancel, on_progress
