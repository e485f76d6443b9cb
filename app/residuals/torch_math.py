"""Correctly rounded task arithmetic in torch, on any device: the math of the torch
backends (CUDA, and the CPU fallback where the native kernel is not built) and of
the in-engine merge. Same bits as the native kernel (``app/residuals/_native.c``).

Each result is the exact value (``instruct - base``, ``target + a*R`` or
``target + a*(instruct - base)``, with ``a`` = alpha rounded to fp32) rounded once to
the output dtype. The fp32 formula plus its exact rounding errors (TwoSum) settles
nearly every element: an fp32 result that lands exactly on a midpoint of the output
format is moved one fp32 ulp towards the true value before the cast, which removes
double rounding. The few elements this cannot prove (an inexact ``instruct - base``,
alpha != 1 next to a midpoint or with cancellation) are recomputed exactly on the
host with :mod:`app.residuals.exact`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.residuals.dtypes import from_torch
from app.residuals.exact import element_bits, to_f32

_F32_MID = 1 << 28  # fp64 bits below fp32 precision: a midpoint of fp32
_F32_LOW = (1 << 29) - 1


def _err(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """TwoSum: the exact error of ``s = fl(a + b)``."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


def _cast_differs(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return lo.to(dtype).float() != hi.to(dtype).float()


def _on_midpoint(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where ``s`` lies exactly halfway between two values of ``dtype`` (or on the
    overflow threshold)."""
    if dtype == torch.bfloat16:
        return (s.view(torch.int32) & 0xFFFF) == 0x8000
    r = s.to(dtype).float()
    other = 2 * s - r  # exact; the neighbour on the other side when s is a midpoint
    mid = torch.isfinite(r) & (other != r) & (other.to(dtype).float() == other)
    top = torch.finfo(dtype).max
    below = float(torch.nextafter(torch.tensor(top, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    return mid | (s.abs() == top + (top - below) / 2)


def _near_midpoint(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where a midpoint of ``dtype`` lies within one fp32 ulp of ``s``."""
    if dtype == torch.bfloat16:
        return ((s.view(torch.int32) & 0xFFFF) - 0x8000).abs() <= 1
    inf = torch.full_like(s, float("inf"))
    lo = torch.nextafter(torch.nextafter(s, -inf), -inf)
    hi = torch.nextafter(torch.nextafter(s, inf), inf)
    return _cast_differs(lo, hi, dtype)


def _scaled(
    t: torch.Tensor, d: torch.Tensor, alpha: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t + a*d`` for alpha != 1: (fp32 formula, rounded result, elements to redo)."""
    a = to_f32(alpha)
    p = d * a
    s = t + p
    hard = p.abs() > s.abs()  # cancellation: the tail may exceed one ulp of s
    hard |= (s == 0) & (d != 0)  # t == -fl(a*d), or a*d underflowed: the sign of a tiny X
    if out_dtype == torch.float32:
        tail = _err(t, p, s).double() + (d.double() * a - p.double())  # product error: exact
        x = s.double() + tail
        low = x.view(torch.int64) & _F32_LOW
        hard |= (low - _F32_MID).abs() <= 4
        hard |= x.abs() < 2.0**-125  # fp32 subnormals round at a higher bit of x
        # an exact zero keeps the sign the fp32 formula gives it
        return s, torch.where(torch.isfinite(s) & (x != 0), x.float(), s), hard
    return s, s.to(out_dtype), hard | _near_midpoint(s, out_dtype)


def _formula(
    kind: str, f: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The fp32 formula ``s``, the result so far, the exact tail of ``s`` where it alone
    decides ties (else None) and the elements that need an exact recomputation."""
    no = torch.zeros_like(f[0], dtype=torch.bool)
    if kind == "convert":
        return f[0], f[0].to(out_dtype), None, no
    if kind == "residual":
        s = f[0] - f[1]
        return s, s, _err(f[0], -f[1], s), no
    if kind not in ("apply", "fused"):
        raise ValueError(f"unknown combine kind {kind!r}")
    hard = no
    if kind == "fused":
        d = f[0] - f[1]
        hard = _err(f[0], -f[1], d) != 0  # inexact in fp32: t + d would round twice
        t = f[2]
    else:
        d, t = f[0], f[1]
    if alpha == 1.0:
        s = t + d
        return s, s, _err(t, d, s), hard
    s, out, scaled_hard = _scaled(t, d, alpha, out_dtype)
    return s, out, None, hard | scaled_hard


def combine(
    kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One element-wise task-arithmetic step, correctly rounded.

    Args:
        kind: ``residual`` (xs = instruct, base), ``apply`` (residual, target),
            ``fused`` (instruct, base, target) or ``convert`` (x).
        xs: 1-D tensors of equal length on one device, fp32/bf16/fp16.
        alpha: residual scale (``apply`` and ``fused``).
        out_dtype: the output's dtype.

    Returns:
        (the output in ``out_dtype``, the fp32 formula's result for statistics).
    """
    if out_dtype == torch.float64 or any(x.dtype == torch.float64 for x in xs):
        return _combine_f64(kind, xs, alpha, out_dtype)
    f = [x.float() for x in xs]
    s, out, tail, hard = _formula(kind, f, alpha, out_dtype)
    finite = torch.isfinite(s)
    if tail is not None:
        if out_dtype != torch.float32:
            fix = _on_midpoint(s, out_dtype) & (tail != 0) & finite
            towards = torch.where(tail > 0, float("inf"), float("-inf"))
            out = torch.where(fix, torch.nextafter(s, towards), s)
        out = out.to(out_dtype)
    inputs_finite = torch.stack([torch.isfinite(x) for x in f]).all(dim=0)
    # finite inputs whose fp32 intermediate overflowed: the exact value may be finite
    _redo_exactly(kind, xs, alpha, out, s, (hard & finite) | (~finite & inputs_finite))
    if out_dtype == torch.bfloat16:  # one NaN encoding, as the native kernel writes
        out.view(torch.int16).masked_fill_(torch.isnan(out), 0x7FC0)
    return out, s


def _combine_f64(
    kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 checkpoints are rare: the float64 formula, one cast, no exactness proof.
    f = [x.double() for x in xs]
    if kind == "convert":
        s = f[0]
    elif kind == "residual":
        s = f[0] - f[1]
    elif kind in ("apply", "fused"):
        d, t = (f[0] - f[1], f[2]) if kind == "fused" else (f[0], f[1])
        s = t + d * alpha if alpha != 1.0 else t + d
    else:
        raise ValueError(f"unknown combine kind {kind!r}")
    return s.to(out_dtype), s


def _redo_exactly(
    kind: str,
    xs: Sequence[torch.Tensor],
    alpha: float,
    out: torch.Tensor,
    s: torch.Tensor,
    hard: torch.Tensor,
) -> None:
    """Recompute the elements the fp32 pass could not prove: in float64 where that is
    exact (nearly always), else with exact rationals on the host."""
    idx = torch.nonzero(hard).flatten()
    if idx.numel() == 0:
        return
    sub = [x[idx].double() for x in xs]
    exact, ok = _exact_f64(kind, sub, alpha)
    rounded = _round_exact(exact[ok], out.dtype)
    formula = s[idx[ok]]  # an exact zero takes the formula's sign when that is zero too
    zero = torch.where(formula == 0, formula, 0.0).to(out.dtype)
    out[idx[ok]] = torch.where(exact[ok] == 0, zero, rounded)
    rest = idx[~ok]
    if rest.numel() == 0:
        return
    code = from_torch(out.dtype).code
    cols = [x[rest].double().tolist() for x in xs]
    bits = [element_bits(kind, vals, alpha, code) for vals in zip(*cols, strict=True)]
    size = out.element_size()
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32}[size]
    signed = [b - (1 << 8 * size) if b >> (8 * size - 1) else b for b in bits]
    out.view(width)[rest] = torch.tensor(signed, dtype=width).to(out.device)


def _exact_f64(
    kind: str, f: Sequence[torch.Tensor], alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact value in float64 and where float64 really held it exactly."""
    ok = torch.ones_like(f[0], dtype=torch.bool)

    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonlocal ok
        s = a + b
        ok &= _err(a, b, s) == 0
        return s

    if kind == "convert":
        return f[0], ok
    if kind == "residual":
        return add(f[0], -f[1]), ok
    d, t = (add(f[0], -f[1]), f[2]) if kind == "fused" else (f[0], f[1])
    if alpha == 1.0:
        return add(t, d), ok
    a = to_f32(alpha)
    dh = d.float().double()  # <= 24 significant bits, so a * dh is exact
    dl = d - dh  # exact; <= 29 significant bits, so a * dl is exact too
    return add(add(t, a * dh), a * dl), ok


def _round_exact(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round exact float64 values once to ``dtype``: fp32 first (one rounding of the
    exact value), then a midpoint of ``dtype`` is moved towards the true value."""
    y = x.float()
    if dtype == torch.float32:
        return y
    tail = x - y.double()  # exact
    fix = _on_midpoint(y, dtype) & (tail != 0) & torch.isfinite(y)
    towards = torch.where(tail > 0, float("inf"), float("-inf")).float()
    return torch.where(fix, torch.nextafter(y, towards), y).to(dtype)
