"""An independent numpy reference of the apply-time merge methods (TIES, DARE, weighted
sums of several residuals) and of the final ``target + alpha * delta`` rounded once.

Written from the definitions in ``app/residuals/sparsify.py``'s docstring, not from its
code: trimming sorts (the engine takes a k-th value), the final rounding works on
float64 bit patterns with an exact error term (the engine's is a kernel or torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tests.helpers import load_dir

F32 = np.float32


def load_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model or pack as float32 numpy (bfloat16 widens exactly)."""
    return {n: t.float().numpy().reshape(-1) for n, t in load_dir(path).items()}


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a bfloat16 or float32 tensor."""
    width = torch.int16 if t.dtype == torch.bfloat16 else torch.int32
    return t.contiguous().view(width).numpy().reshape(-1)


def trim(r: np.ndarray, density: float) -> np.ndarray:
    n = r.size
    if density >= 1 or n == 0:
        return r
    k = max(1, int(density * n))
    order = np.lexsort((np.arange(n), -np.abs(r)))  # magnitude descending, then index
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    return np.where(keep, r, F32(0))


def ties(deltas: Sequence[np.ndarray], weights: Sequence[float], density: float) -> np.ndarray:
    terms = [trim(d, density) * F32(w) for d, w in zip(deltas, weights, strict=True)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    elected = np.sign(total)
    num = np.zeros_like(total)
    den = np.zeros_like(total)
    for t, w in zip(terms, weights, strict=True):
        agree = (np.sign(t) == elected) & (t != 0)
        num = num + np.where(agree, t, F32(0))
        den = den + np.where(agree, F32(w), F32(0))
    return num / np.where(den == 0, F32(1), den)


def uniform(seed: int, index: int, name: str, n: int) -> np.ndarray:
    digest = hashlib.sha256(f"realign.dare\0{seed}\0{index}\0{name}".encode()).digest()
    raw = np.random.Philox(key=int.from_bytes(digest[:16], "little")).random_raw(n)
    return (raw >> np.uint64(40)).astype(F32) / F32(2**24)


def dare(
    deltas: Sequence[np.ndarray], weights: Sequence[float], p: float, seed: int, name: str
) -> np.ndarray:
    total = None
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        if p > 0:
            keep = uniform(seed, i, name, d.size) >= F32(p)
            d = np.where(keep, d * F32(1 / (1 - p)), F32(0))
        term = d * F32(w)
        total = term if total is None else total + term
    assert total is not None
    return total


def weighted_sum(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return dare(deltas, weights, 0.0, 0, "")


def round_once(s: np.ndarray, e: np.ndarray, mantissa: int) -> np.ndarray:
    """Round ``s + e`` (``s`` float64, ``e`` its exact error, |e| <= half an ulp of s) once,
    to nearest-even, to ``mantissa`` stored bits; returns float64 values."""
    drop = 52 - mantissa
    raw = s.view(np.int64)
    sign = raw & np.int64(-(2**63))
    mag = raw & np.int64(2**63 - 1)
    low = mag & np.int64((1 << drop) - 1)
    half = np.int64(1 << (drop - 1))
    trunc = mag - low
    odd = ((trunc >> drop) & 1) == 1
    away = ((e > 0) & (sign == 0)) | ((e < 0) & (sign != 0))
    up = (low > half) | ((low == half) & np.where(e == 0, odd, away))
    return (sign | (trunc + (up.astype(np.int64) << drop))).view(np.float64)


def apply(delta: np.ndarray, target: np.ndarray, alpha: float, dtype: torch.dtype) -> np.ndarray:
    """The bits of ``target + fl32(alpha) * delta`` rounded once to ``dtype``."""
    a = np.float64(F32(alpha))
    p = a * delta.astype(np.float64)  # exact: 24 x 24 bits
    t = target.astype(np.float64)
    s = t + p
    bb = s - t
    e = (t - (s - bb)) + (p - bb)  # TwoSum: the exact error of s
    if dtype == torch.float32:
        return round_once(s, e, 23).astype(F32).view(np.int32)
    return (round_once(s, e, 7).astype(F32).view(np.int32) >> 16).astype(np.int16)


def merged_bits(
    method: str,
    params: dict[str, float | int],
    packs: Sequence[tuple[Path, float]],
    target: Path,
    alpha: float,
) -> dict[str, np.ndarray]:
    """The reference bits of every merged tensor (non-float ones left out)."""
    rs = [load_f32(p) for p, _ in packs]
    weights = [w for _, w in packs]
    tgt = load_dir(target)
    out = {}
    for name, t in tgt.items():
        if not t.is_floating_point():
            continue
        deltas = [r[name] for r in rs]
        if method == "ties":
            delta = ties(deltas, weights, float(params["density"]))
        elif method == "dare":
            delta = dare(deltas, weights, float(params["drop_rate"]), int(params["seed"]), name)
        else:
            delta = weighted_sum(deltas, weights)
        out[name] = apply(delta, t.float().numpy().reshape(-1), alpha, t.dtype)
    return out
