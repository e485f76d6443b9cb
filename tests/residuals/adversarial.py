"""Weight-like inputs with nasty elements, and a backend's result on them: what the
backend comparisons (CPU here, CUDA in test_cuda.py) feed every backend."""

from __future__ import annotations

import torch

from app.residuals.devices import MathBackend
from app.residuals.dtypes import DType, from_torch
from app.residuals.methods import get_method

ARITY = {"residual": 2, "apply": 2, "fused": 3, "convert": 1}
N = 300_000


def adversarial_inputs(dtype: torch.dtype, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``k`` inputs of :data:`N` elements: weight-like data with nasty elements sprinkled in."""
    base = torch.randn(N, generator=gen) * 0.02
    xs = [(base + torch.randn(N, generator=gen) * 1e-3 * (j + 1)).to(dtype) for j in range(k)]
    f = [x.float() for x in xs]
    # bf16/f16 ties: force the sum onto a midpoint of the output for a slice
    if k == 3:
        f[0][:2000] = f[1][:2000] + torch.ldexp(torch.ones(2000), torch.randint(-20, -8, (2000,)))
    # huge exponent gaps, cancellation, zeros of both signs, subnormals, NaN, inf
    f[0][2000:2100] = torch.randn(100, generator=gen) * 1e-30
    if k > 1:
        f[1][2100:2200] = -f[0][2100:2200]
        f[-1][2200:2210] = -0.0
    f[0][2210:2220] = torch.ldexp(torch.ones(10), torch.tensor(-140))
    f[0][2220], f[0][2221], f[0][2222] = float("nan"), float("inf"), -float("inf")
    f[0][2223:2230] = 65519.0
    # an fp32 intermediate overflows while the exact result is finite
    f[0][2230:2240] = 3e38
    if k == 3:
        f[1][2230:2240], f[2][2230:2240] = -3e38, -3e38
    # zeros of both signs everywhere, and products that underflow
    for x in f:
        x[2240:2250] = -0.0
        x[2250:2255] = 0.0
    f[0][2255:2265] = -3e-18
    if k > 1:
        f[-1][2255:2265] = 0.0
    return [x.to(dtype) for x in f]


def run_backend(
    backend: MathBackend, kind: str, xs: list[torch.Tensor], out: DType, alpha: float
) -> tuple[torch.Tensor, tuple[float, float]]:
    """``backend``'s ``kind`` of ``xs`` (host tensors) into a new host tensor, and its stats."""
    dst = torch.empty(xs[0].numel(), dtype=out.torch)
    ops = [(memoryview(x.view(torch.uint8).numpy()), from_torch(x.dtype)) for x in xs]
    stats = backend.combine(
        get_method("task_arithmetic"),
        kind,
        ops,
        memoryview(dst.view(torch.uint8).numpy()),
        out,
        alpha,
        want_stats=kind == "residual",
    )
    return dst, stats


def differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Indices where two results differ bit for bit (NaN payloads aside: not part of the
    contract, except bf16's, which is always 0x7FC0)."""
    width = {2: torch.int16, 4: torch.int32}[a.element_size()]
    both_nan = a.isnan() & b.isnan() & (a.dtype != torch.bfloat16)
    return torch.nonzero((a.view(width) != b.view(width)) & ~both_nan).flatten()
