"""On a GPU: the CUDA backend gives the native kernel's bytes on adversarial values and
on every streaming path in many chunks (bf16/fp16/fp32 in and out; alpha 1, 0.7, -2),
on each GPU present, and the in-engine merge stays within its scratch budget on the GPU.
Skipped where torch sees no CUDA device (see tests/conftest.py); `scripts/gpu-check`
runs them on a GPU node."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple, make_triple
from app.merge import compute, merge
from app.residuals.devices import NativeBackend
from app.residuals.dtypes import BF16, EXACT, F16, F32, DType
from app.residuals.inline import stream_merged
from app.residuals.sources import RunOptions
from app.residuals.torch_backends import CudaBackend
from tests.helpers import load_dir
from tests.residuals.adversarial import ARITY, adversarial_inputs, differing, run_backend
from tests.residuals.merge_paths import assert_same_bits, run_paths

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 3000  # elements: every tensor of the tiny models in several chunks
GPUS = ["cuda:0", "cuda:1"]  # cuda:1 runs where a second GPU is present


def _gpu(device: str) -> str:
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        pytest.skip(f"{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@pytest.fixture(scope="module")
def llama_triple_fp16(tmp_path_factory: pytest.TempPathFactory) -> TinyTriple:
    return make_triple(tmp_path_factory.mktemp("llama_fp16"), dtype=torch.float16)


@pytest.fixture(scope="module")
def wide_triple(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's generator at its smallest (one layer, 0.18e9 parameters): a
    32000 x 2048 embedding whose whole-tensor merge scratch would be ~5 GB."""
    out = tmp_path_factory.mktemp("wide") / "triple"
    gen = [sys.executable, str(ROOT / "bench" / "gen_checkpoints.py"), "--params", "1e8",
           "--out", str(out), "--shard-gb", "0.2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(gen, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.gpu
def test_cuda_merge_equals_cpu(llama_triple: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    t = llama_triple
    for device in ("cpu", "cuda"):
        merge(
            str(t.base),
            str(t.instruct),
            str(t.new_base),
            tmp_path / device,
            alpha=0.7,
            store=store_dir / device,
            device=device,
            no_cache=True,
        )
        compute(str(t.base), str(t.instruct), store=store_dir / device, device=device)
    cpu, gpu = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert all(torch.equal(cpu[k], gpu[k]) for k in cpu)
    r_cpu = load_dir(next((store_dir / "cpu" / "residuals").iterdir()))
    r_gpu = load_dir(next((store_dir / "cuda" / "residuals").iterdir()))
    assert all(torch.equal(r_cpu[k], r_gpu[k]) for k in r_cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("device", GPUS)
@pytest.mark.parametrize("kind", list(ARITY))
def test_adversarial_values_native_vs_cuda_bit_for_bit(kind: str, device: str) -> None:
    cuda = CudaBackend(_gpu(device))
    native = NativeBackend(workers=2)
    gen = torch.Generator().manual_seed(11)
    combos = itertools.product(
        (torch.bfloat16, torch.float16, torch.float32), (BF16, F16, F32), (1.0, 0.7, -2.0)
    )
    for in_dtype, out, alpha in combos:
        if kind in ("residual", "convert") and alpha != 1.0:
            continue
        xs = adversarial_inputs(in_dtype, ARITY[kind], gen)
        a, sa = run_backend(native, kind, xs, out, alpha)
        b, sb = run_backend(cuda, kind, xs, out, alpha)
        where = f"{device}: {kind} {in_dtype}->{out.name} alpha={alpha}"
        diff = differing(a, b)
        assert diff.numel() == 0, f"{where}: {diff.numel()} differ, first at {diff[:5].tolist()}"
        if kind == "residual":
            assert sa[0] == pytest.approx(sb[0], rel=1e-6, nan_ok=True), where
    cuda.close()
    native.close()


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("triple", "dtype", "alpha"),
    [
        ("llama_triple", BF16, 0.7),
        ("llama_triple", EXACT, 1.0),
        ("llama_triple", F32, -2.0),
        ("llama_triple_fp16", F16, 0.7),
        ("llama_triple_fp16", BF16, -2.0),
        ("llama_triple_fp16", EXACT, 0.7),
        ("llama_triple_fp32", F32, 1.0),
        ("llama_triple_fp32", BF16, 0.7),
        ("llama_triple_extra_vocab", F16, -2.0),
    ],
)
def test_every_streaming_path_on_cuda_gives_the_native_bits(
    triple: str, dtype: DType, alpha: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    cpu = RunOptions(chunk_elems=CHUNK, hash_outputs=False)
    want = run_paths(t, tmp_path / "cpu", cpu, alpha=alpha, dtype=dtype)
    cuda = RunOptions(device="cuda", chunk_elems=CHUNK, hash_outputs=False)
    got = run_paths(t, tmp_path / "cuda", cuda, alpha=alpha, dtype=dtype)
    assert_same_bits(want, got, f"{triple} {dtype.name} alpha={alpha}")


@pytest.mark.gpu
def test_paths_on_the_second_gpu(llama_triple: TinyTriple, tmp_path: Path) -> None:
    device = _gpu("cuda:1")
    cpu = RunOptions(chunk_elems=CHUNK, hash_outputs=False)
    want = run_paths(llama_triple, tmp_path / "cpu", cpu, alpha=0.7, dtype=BF16)
    on_1 = RunOptions(device=device, chunk_elems=CHUNK, hash_outputs=False)
    got = run_paths(llama_triple, tmp_path / "cuda1", on_1, alpha=0.7, dtype=BF16)
    assert_same_bits(want, got, device)
    assert torch.cuda.max_memory_allocated(1) > 0  # the work ran on that GPU


@pytest.mark.gpu
def test_in_engine_merge_on_cuda_stays_within_its_scratch_budget(
    wide_triple: Path, tmp_path: Path
) -> None:
    base, instruct, new_base = (str(wide_triple / n) for n in ("base", "instruct", "new_base"))
    res = merge(base, instruct, new_base, tmp_path / "m", alpha=0.7, store=tmp_path / "s")
    written = load_dir(res.out)
    pack = tmp_path / "s" / "residuals" / (res.residual_key or "")
    scratch = 64 << 20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    largest, seen = 0, 0
    for name, x in stream_merged(pack, Path(new_base), 0.7, "cuda", scratch_bytes=scratch):
        assert x.is_cuda
        largest = max(largest, x.numel() * x.element_size())
        assert torch.equal(x.cpu().view(torch.uint8), written[name].view(torch.uint8)), name
        seen += 1
        del x  # one merged tensor held at a time, as vLLM's loader does
    peak = torch.cuda.max_memory_allocated() - before
    assert seen == len(written)
    assert largest * 80 > 50 * scratch  # the embedding's whole-tensor scratch: far over
    assert peak <= largest + scratch, f"peak {peak / 2**20:.0f} MiB over the budget"
