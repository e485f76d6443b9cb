"""Every math backend gives the same bits: the native kernel and torch (the CPU
fallback; the CUDA backend runs the same torch code) on realistic and adversarial
data, for every kind, dtype combination and a few alphas."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.residuals import native
from app.residuals.devices import NativeBackend
from app.residuals.dtypes import BF16, F16, F32, DType, from_torch
from app.residuals.methods import get_method
from app.residuals.torch_backends import TorchCpuBackend

ARITY = {"residual": 2, "apply": 2, "fused": 3, "convert": 1}
N = 300_000


def _inputs(dtype: torch.dtype, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Weight-like data with nasty elements sprinkled in."""
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


def _run(backend: object, kind: str, xs: list[torch.Tensor], out: DType, alpha: float) -> tuple:
    dst = torch.empty(N, dtype=out.torch)
    ops = [(memoryview(x.view(torch.uint8).numpy()), from_torch(x.dtype)) for x in xs]
    stats = backend.combine(  # type: ignore[attr-defined]
        get_method("task_arithmetic"),
        kind,
        ops,
        memoryview(dst.view(torch.uint8).numpy()),
        out,
        alpha,
        want_stats=kind == "residual",
    )
    return dst, stats


@pytest.mark.parametrize("kind", list(ARITY))
def test_native_and_torch_backends_agree_bit_for_bit(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    native_be, torch_be = NativeBackend(workers=2), TorchCpuBackend()
    combos = itertools.product(
        (torch.bfloat16, torch.float16, torch.float32),
        (BF16, F16, F32),
        (1.0, 0.7, -2.0, 1e-30),
    )
    for in_dtype, out, alpha in combos:
        if kind in ("residual", "convert") and alpha != 1.0:
            continue
        xs = _inputs(in_dtype, ARITY[kind], gen)
        a, sa = _run(native_be, kind, xs, out, alpha)
        b, sb = _run(torch_be, kind, xs, out, alpha)
        width = torch.int16 if out.itemsize == 2 else torch.int32
        # NaN payloads are not part of the contract (bf16 NaN is always 0x7FC0)
        both_nan = a.isnan() & b.isnan() & (out.code != "BF16")
        diff = torch.nonzero((a.view(width) != b.view(width)) & ~both_nan).flatten()
        where = f"{kind} {in_dtype}->{out.name} alpha={alpha}"
        assert diff.numel() == 0, f"{where}: {diff.numel()} differ, first at {diff[:5].tolist()}"
        if kind == "residual":
            assert sa[0] == pytest.approx(sb[0], rel=1e-6, nan_ok=True), where
    native_be.close()


def test_cpu_falls_back_to_torch_when_the_kernel_is_not_built(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from app.residuals import devices

    assert isinstance(devices.make_backend("cpu"), NativeBackend)
    # what a machine without a C compiler at install time sees
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "load_error", lambda: "the extension was not built")
    with caplog.at_level("WARNING"):
        backend = devices.make_backend("cpu")
    assert isinstance(backend, TorchCpuBackend)
    assert "the extension was not built" in caplog.text
    with pytest.raises(Exception, match="unknown device 'tpu'"):
        devices.make_backend("tpu")


def test_fp32_subnormal_results_with_alpha_agree() -> None:
    # t + a*d lands in the fp32 subnormal range while a*d reaches far below it
    alpha = 13264529 * 2.0**-48
    d = torch.tensor([10610063 * 2.0**-149] * 2 + [-10610063 * 2.0**-149] * 2)
    t = torch.tensor([(2**22 + 1) * 2.0**-149, 0x3FFFFF * 2.0**-149] * 2)
    t[2:] = -t[2:]
    ops = [(memoryview(x.numpy()).cast("B"), F32) for x in (d, t)]
    outs = []
    for backend in (NativeBackend(workers=1), TorchCpuBackend()):
        dst = torch.empty(4, dtype=torch.float32)
        backend.combine(
            get_method("task_arithmetic"), "apply", ops, memoryview(dst.numpy()).cast("B"),
            F32, alpha, want_stats=False,
        )  # fmt: skip
        outs.append(dst.view(torch.int32).tolist())
    assert outs[0] == outs[1]
    assert [abs(b) for b in outs[0][:2]] == [0x400001, 0x3FFFFF]
