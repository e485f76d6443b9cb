"""GPU benchmark: merge throughput on CUDA against the CPU kernel, hot swap against a cold
start of the official vLLM on the GPU, and the GPU memory of an in-engine merge of the
largest tensor. Writes the figures, ready for ``bench/GPU.md``, to one markdown file.
``scripts/gpu-check`` runs it after the GPU tests (sized for a few minutes on one H100).

    python bench/gpu.py --out bench/gpu-results.md          # on a GPU node
    python bench/gpu.py --dry-run --out /tmp/gpu-results.md  # every part on a tiny triple, CPU

1. Merge throughput: the fused merge (``--no-cache``) and a pair's first cached merge
   (residual + model in one pass: the residual stays on the GPU for the apply step) of a
   generated 1.1e9-parameter bf16 triple (``gen_checkpoints.py``), on ``cuda`` and on the
   CPU kernel, in this process, inputs in the page cache. GB/s = (bytes read + bytes
   written) / wall. The bound is the slower of the disk (page-cache read + durable write
   bandwidth, one after the other) and PCIe (pinned copies each way), measured here.
2. GPU peak of an in-engine merge (``stream_merged``) of the largest tensor with the
   default scratch budget, next to what merging it whole would take.
3. vLLM on the GPU: a cold engine start vs an in-place hot swap vs an in-engine merge,
   each until the first greedy token.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from math import prod
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent))  # this checkout's app, installed or not

import gen_checkpoints as gen  # noqa: E402
from measure import read_files, safetensors_files, size_of, write_file  # noqa: E402

NAMES = ("base", "instruct", "new_base")
ALPHA = 0.7
PROBE = [0, 5, 6, 7]
MIB = 2**20


@dataclass
class Report:
    """Figure rows (what, figure, detail) and notes, printed as they come."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, figure: str, detail: str = "") -> None:
        self.rows.append((what, figure, detail))
        print(f"  {what}: {figure}  {detail}", flush=True)


@dataclass(frozen=True)
class Bounds:
    """Bandwidths in bytes/s measured in this run (PCIe: 0 without a GPU)."""

    read: float
    write: float
    h2d: float = 0.0
    d2h: float = 0.0

    def seconds(self, read: int, written: int) -> tuple[float, float]:
        """(disk bound, PCIe bound) of a merge moving these bytes."""
        disk = read / self.read + written / self.write
        pcie = max(read / self.h2d, written / self.d2h) if self.h2d else 0.0
        return disk, pcie


def triple(work: Path, params: float, dry: bool) -> Path:
    """The bf16 triple: generated once into ``work`` (reused after), tiny in a dry run."""
    if dry:
        import torch

        from app.demo.tiny import make_triple

        root = work / "tiny"
        if not (root / "new_base").is_dir():
            make_triple(root, dtype=torch.bfloat16, shards=2)
        return root
    out = work / f"triple-{params:.2g}"
    if not (out / "info.json").is_file():
        gen.generate(out, params, 1.0, 0)
    return out


def disk_bandwidths(t: Path, work: Path) -> tuple[float, float]:
    """Page-cache read and durable write bandwidths, bytes/s."""
    files = safetensors_files(*(t / n for n in NAMES))
    read_files(files)  # into the page cache, as the merges will find them
    n, secs = read_files(files)
    size = min(size_of(files) // 3, 1 << 30)
    try:
        w = write_file(work / "write-probe", size, direct=True)
    except OSError:  # no O_DIRECT here (tmpfs)
        w = write_file(work / "write-probe", size, direct=False)
    return n / secs, size / w


def pcie(nbytes: int = 1 << 30) -> tuple[float, float]:
    """Pinned host <-> device copy bandwidths (best of 3), bytes/s."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def once(dst: torch.Tensor, src: torch.Tensor) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return nbytes / (start.elapsed_time(end) / 1e3)

    once(dev, host), once(host, dev)  # warm-up
    up, down = max(once(dev, host) for _ in range(3)), max(once(host, dev) for _ in range(3))
    del host, dev
    torch.cuda.empty_cache()
    return up, down


def merge_once(t: Path, work: Path, device: str, fused: bool) -> tuple[float, int]:
    """One merge into ``work``: (wall seconds, bytes written)."""
    from app.merge import merge, remove

    out, store = work / f"out-{device}", work / f"store-{device}"
    t0 = time.perf_counter()
    res = merge(str(t / "base"), str(t / "instruct"), str(t / "new_base"), out, alpha=ALPHA,
                store=store, device=device, no_cache=fused, overwrite=True)  # fmt: skip
    wall = time.perf_counter() - t0
    written = size_of(safetensors_files(out))
    if res.residual_key:  # the one pass wrote the pack too; removed for the next run
        pack = store / "residuals" / res.residual_key
        written += sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
        remove(res.residual_key, store)
    return wall, written


def merges(
    t: Path, work: Path, devices: list[str], rounds: int, bounds: Bounds, rep: Report
) -> None:
    read = size_of(safetensors_files(*(t / n for n in NAMES)))
    for fused, label in (
        (True, "fused merge (--no-cache)"),
        (False, "first cached merge (one pass)"),
    ):
        walls: dict[str, float] = {}
        for device in devices:
            runs = [merge_once(t, work, device, fused) for _ in range(rounds + 1)][
                1:
            ]  # 1st: warm-up
            wall, written = statistics.median(r[0] for r in runs), runs[0][1]
            walls[device] = wall
            disk, link = bounds.seconds(read, written)
            bound = max(disk, link)
            moved = f"{read / 1e9:.1f} GB read + {written / 1e9:.1f} GB written"
            bound_s = f"{wall / bound:.2f}x its bound (disk {disk:.2f} s, PCIe {link:.2f} s)"
            rep.add(f"{label}, {device}", f"{(read + written) / wall / 1e9:.2f} GB/s",
                    f"{wall:.2f} s for {moved}; {bound_s}")  # fmt: skip
        if len(walls) == 2:
            rep.add(f"{label}: cuda vs cpu kernel", f"{walls['cpu'] / walls['cuda']:.2f}x")


def inline_peak(t: Path, pack: Path, device: str, rep: Report) -> None:
    """The in-engine merge of the largest tensor, with the default scratch budget."""
    import torch

    from app.residuals.checkpoint import Checkpoint
    from app.residuals.inline import COMBINE_BYTES, DEFAULT_SCRATCH_BYTES, stream_merged

    with Checkpoint.open(t / "new_base") as ckpt:
        name, info = max(ckpt.tensors.items(), key=lambda kv: kv[1].nbytes)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    for _, x in stream_merged(pack, t / "new_base", ALPHA, device, names={name}):
        del x
    secs = time.perf_counter() - t0
    whole = prod(info.shape) * (COMBINE_BYTES + 3 * info.dtype.itemsize)
    budget = DEFAULT_SCRATCH_BYTES
    peak = f"{(torch.cuda.max_memory_allocated() - before) / MIB:.0f} MiB" if cuda else "n/a (CPU)"
    rep.add(f"in-engine merge of the largest tensor ({name} {tuple(info.shape)})", peak,
            f"GPU peak; tensor {info.nbytes / MIB:.0f} MiB + budget {budget / MIB:.0f} MiB; "
            f"merged whole it would take ~{whole / MIB:.0f} MiB; {secs:.2f} s")  # fmt: skip


async def first_token(step: Callable[[], Awaitable[object]], engine: Any) -> float:
    """Seconds for ``step`` plus one greedy token after it."""
    from app.engines.base import GenerationRequest

    t0 = time.perf_counter()
    await step()
    async for _ in engine.generate(GenerationRequest(PROBE, 1, 0.0)):
        pass
    return time.perf_counter() - t0


async def vllm_parts(t: Path, pack: Path, cold_starts: int) -> dict[str, list[float]]:
    from app.engines.base import InlineMerge
    from app.engines.vllm import VllmEngine, _engine_classes

    _engine_classes()  # vLLM's import is paid once, not by each start
    a, b = t / "base", t / "new_base"
    r: dict[str, list[float]] = {"cold": [], "swap": [], "inline": []}
    for i in range(cold_starts):
        engine = VllmEngine(b, dtype="bfloat16", enforce_eager=True, max_model_len=256,
                            max_num_seqs=8, gpu_memory_utilization=0.5)  # fmt: skip
        r["cold"].append(await first_token(engine.start, engine))
        if i == 0:
            for j in range(3):
                swap = partial(engine.reload, (a, b)[j % 2])
                r["swap"].append(await first_token(swap, engine))
            inline = partial(engine.reload_merged, InlineMerge(pack, b, ALPHA))
            for _ in range(2):
                r["inline"].append(await first_token(inline, engine))
        await engine.close()
    return r


def vllm_rows(t: Path, pack: Path, cold_starts: int, rep: Report) -> None:
    import torch

    torch.cuda.empty_cache()  # the engine's worker process takes its share of what is free
    r = asyncio.run(vllm_parts(t, pack, cold_starts))
    cold, swap, inline = (statistics.median(r[k]) for k in ("cold", "swap", "inline"))
    rep.add("vLLM cold start (bf16, eager), until the first token", f"{cold:.2f} s",
            f"median of {len(r['cold'])}")  # fmt: skip
    rep.add("vLLM hot swap in place (`reload`), until the first token", f"{swap:.2f} s",
            f"{cold / swap:.0f}x faster than a cold start; median of {len(r['swap'])}")  # fmt: skip
    rep.add("vLLM in-engine merge (`reload_merged`), until the first token", f"{inline:.2f} s",
            f"alpha {ALPHA}, from the exact pack; median of {len(r['inline'])}")  # fmt: skip


def machine(dry: bool) -> list[str]:
    import torch

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    line = f"- GPU: {gpu}; CUDA {torch.version.cuda}; torch {torch.__version__}; "
    line += f"vllm {version('vllm')}; {os.cpu_count()} CPUs"
    return [line + (" (dry run)" if dry else "")]


def write_markdown(out: Path, rep: Report, dry: bool, started: float) -> None:
    title = "# GPU benchmark" + (" (dry run: tiny triple, CPU only)" if dry else "")
    minutes = (time.monotonic() - started) / 60
    lines = [title, "", f"Generated by `python bench/gpu.py` in {minutes:.1f} min.", "",
             "## Machine", "", *machine(dry), "", "## Figures", "",
             "| what | figure | detail |", "|---|---|---|",
             *(f"| {w} | {f} | {d} |" for w, f, d in rep.rows), "", "## Notes", "",
             *(f"- {n}" for n in rep.notes), ""]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}", flush=True)


def run(args: argparse.Namespace, rep: Report) -> None:
    from app.merge import compute

    cuda = not args.dry_run
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"[triple] {args.params:.2g} parameters" if cuda else "[triple] tiny (dry run)")
    t = triple(args.work, args.params, args.dry_run)
    print("[bandwidths]", flush=True)
    read, write = disk_bandwidths(t, args.work)
    bounds = Bounds(read, write, *(pcie() if cuda else (0.0, 0.0)))
    rep.notes.append(f"Bandwidths: page-cache read {read / 1e9:.1f} GB/s, durable write "
                     f"{write / 1e9:.1f} GB/s, PCIe up {bounds.h2d / 1e9:.1f} GB/s, down "
                     f"{bounds.d2h / 1e9:.1f} GB/s.")  # fmt: skip
    print("[merges]", flush=True)
    merges(t, args.work, ["cuda", "cpu"] if cuda else ["cpu"], args.rounds, bounds, rep)
    pack = compute(str(t / "base"), str(t / "instruct"), store=args.work / "store-pack").path
    print("[inline]", flush=True)
    inline_peak(t, pack, "cuda" if cuda else "cpu", rep)
    print("[vllm]", flush=True)
    if cuda and not args.skip_vllm:
        vllm_rows(t, pack, args.cold_starts, rep)
    else:
        why = "dry run" if args.dry_run else "--skip-vllm"
        plan = f"{args.cold_starts} cold starts, 3 hot swaps, 2 in-engine merges, bf16, eager"
        rep.notes.append(f"vLLM part not run ({why}); planned: {plan}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "gpu-results.md", help="markdown file")
    ap.add_argument("--work", type=Path, default=HERE / "data" / "gpu", help="triple + outputs")
    ap.add_argument("--params", type=float, default=1.1e9, help="triple size (>= 1e9)")
    ap.add_argument("--rounds", type=int, default=2, help="timed merges per case")
    ap.add_argument("--cold-starts", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny triple, CPU only, no vLLM")
    args = ap.parse_args()
    started, rep = time.monotonic(), Report()
    if args.dry_run:
        args.rounds = 1
    try:
        run(args, rep)
    finally:
        write_markdown(args.out, rep, args.dry_run, started)


if __name__ == "__main__":
    main()
