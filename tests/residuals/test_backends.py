"""Every math backend gives the same bits: the native kernel and torch (the CPU
fallback, and the staged device pipeline on the CPU: the CUDA backend's data flow) on
realistic and adversarial data, for every kind, dtype combination and a few alphas."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.residuals import native
from app.residuals.devices import NativeBackend
from app.residuals.dtypes import BF16, F16, F32
from app.residuals.methods import get_method
from app.residuals.overlap import host_lanes
from app.residuals.torch_backends import StagedBackend, TorchCpuBackend
from tests.residuals.adversarial import ARITY, adversarial_inputs, differing, run_backend


@pytest.mark.parametrize("kind", list(ARITY))
def test_native_and_torch_backends_agree_bit_for_bit(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    native_be, torch_be = NativeBackend(workers=2), TorchCpuBackend()
    staged = StagedBackend(torch.device("cpu"), host_lanes(), pinned=False)
    combos = itertools.product(
        (torch.bfloat16, torch.float16, torch.float32),
        (BF16, F16, F32),
        (1.0, 0.7, -2.0, 1e-30),
    )
    for in_dtype, out, alpha in combos:
        if kind in ("residual", "convert") and alpha != 1.0:
            continue
        xs = adversarial_inputs(in_dtype, ARITY[kind], gen)
        a, sa = run_backend(native_be, kind, xs, out, alpha)
        for other in (torch_be, staged):
            b, sb = run_backend(other, kind, xs, out, alpha)
            where = f"{other.name}: {kind} {in_dtype}->{out.name} alpha={alpha}"
            diff = differing(a, b)
            assert diff.numel() == 0, (
                f"{where}: {diff.numel()} differ, first at {diff[:5].tolist()}"
            )
            if kind == "residual":
                assert sa[0] == pytest.approx(sb[0], rel=1e-6, nan_ok=True), where
    native_be.close()
    staged.close()


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
