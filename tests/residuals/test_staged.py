"""The CUDA backend's data flow, run on the CPU: every streaming path through the staged
pipeline (upload, compute, download lanes; a chunk's math issued once the next chunk is
uploaded; the residual kept on the device for the apply step) gives the native kernel's
bytes, in many small chunks, with the writer waiting on each chunk's completion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple
from app.residuals import devices
from app.residuals.devices import MathBackend
from app.residuals.dtypes import BF16, EXACT, F16, F32, DType
from app.residuals.overlap import host_lanes
from app.residuals.sources import RunOptions
from app.residuals.torch_backends import StagedBackend
from tests.residuals.merge_paths import assert_same_bits, run_paths

CHUNK = 3000  # elements: every tensor of the tiny models in several chunks, or row by row


def _staged(_device: str) -> MathBackend:
    return StagedBackend(torch.device("cpu"), host_lanes(), pinned=False)


@pytest.mark.parametrize(
    ("triple", "dtype", "alpha"),
    [
        ("llama_triple", BF16, 0.7),  # one pass: apply reads the residual step's result
        ("llama_triple", EXACT, 1.0),  # exact pack: p is read back for the split
        ("llama_triple_fp32", F16, -2.0),
        ("llama_triple_extra_vocab", F32, 0.7),  # rows past the common ones: converted
    ],
)
def test_staged_pipeline_gives_the_native_bits_on_every_path(
    triple: str,
    dtype: DType,
    alpha: float,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    opts = RunOptions(chunk_elems=CHUNK, hash_outputs=False)
    want = run_paths(t, tmp_path / "native", opts, alpha=alpha, dtype=dtype)
    monkeypatch.setitem(devices.BACKENDS, "cpu", _staged)
    assert isinstance(devices.make_backend("cpu"), StagedBackend)
    got = run_paths(t, tmp_path / "staged", opts, alpha=alpha, dtype=dtype)
    assert_same_bits(want, got, f"{triple} {dtype.name} alpha={alpha}")


def _view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy())


def test_a_later_step_reads_an_earlier_result_where_it_was_computed() -> None:
    from app.residuals.devices import NativeBackend
    from app.residuals.methods import get_method
    from app.residuals.steps import Prior, Step

    gen = torch.Generator().manual_seed(3)
    i, b, t = ((torch.randn(50_000, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(3))
    method = get_method("task_arithmetic")
    outs = {}
    for name, backend in (("native", NativeBackend(workers=1)), ("staged", _staged("cpu"))):
        r, m = torch.empty_like(i), torch.empty_like(i)
        steps = [
            Step("residual", ((_view(i), BF16), (_view(b), BF16)), _view(r), BF16,
                 want_stats=True),
            Step("apply", (Prior(0), (_view(t), BF16)), _view(m), BF16, alpha=0.7),
        ]  # fmt: skip
        pending = backend.submit(method, steps)
        backend.flush()
        stats = pending.wait()
        backend.close()
        outs[name] = (r, m, stats)
    (r0, m0, s0), (r1, m1, s1) = outs["native"], outs["staged"]
    assert torch.equal(r0.view(torch.int16), r1.view(torch.int16))
    assert torch.equal(m0.view(torch.int16), m1.view(torch.int16))
    assert s0[0][0] == pytest.approx(s1[0][0], rel=1e-9) and s0[0][1] == s1[0][1]
    assert s0[1] == s1[1] == (0.0, 0.0)
    # a step may only read one that precedes it
    bad = [Step("apply", (Prior(0), (_view(t), BF16)), _view(m0), BF16)]
    for backend in (NativeBackend(workers=1), _staged("cpu")):
        with pytest.raises(ValueError, match="does not precede it"):
            backend.submit(method, bad)
