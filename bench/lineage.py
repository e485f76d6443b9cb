"""What the lineage check costs, and the figures its limit is calibrated on.

Cost: the check as preflight runs it (headers already parsed) on the 1.1B triple,
in a fresh process (first run: its pages as the page cache has them) and then warm;
and what it reads. Calibration: the relative distances of related and unrelated
pairs: the 1.1B triple (instruct = base + N(0, 1e-3), new base + N(0, 2e-3)), the
tests' random tiny triple and a tiny model of the same config from another seed, and
the demo's trained tiny triple against the same recipe trained from another seed
(``--demo``: trains both, about a minute each on 2 idle cores, or reuses them).

    .venv/bin/python bench/gen_checkpoints.py      # once: bench/data/1b
    .venv/bin/python bench/lineage.py [--demo bench/data/work-lineage]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.residuals.checkpoint import Checkpoint  # noqa: E402
from app.residuals.lineage import ROWS, measure, sample_tensors  # noqa: E402


def figures(base: Path, **models: Path) -> dict[str, float]:
    """Median relative distance per pair."""
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(Checkpoint.open(base))
        opened = {r: stack.enter_context(Checkpoint.open(p)) for r, p in models.items()}
        distances, _ = measure(b, opened)
    return {pair: round(d.median, 4) for pair, d in distances.items()}


def cost(data: Path, runs: int) -> None:
    with contextlib.ExitStack() as stack:
        roles = ("base", "instruct", "new_base")
        b, i, t = (stack.enter_context(Checkpoint.open(data / n)) for n in roles)
        names = sample_tensors(b.tensors)
        read = sum(ROWS * b.tensors[n].row_bytes for n in names) * 3
        times, cpu = [], []
        for _ in range(runs):
            start, cpu0 = time.perf_counter(), time.process_time()
            distances, _ = measure(b, {"instruct": i, "target": t})
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - cpu0) * 1e3)
    print(f"1.1B triple ({data}): {len(names)} tensors x {ROWS} rows x 3 models = "
          f"{len(names) * ROWS * 3} reads, {read / 1e6:.2f} MB")  # fmt: skip
    print(
        f"  first run {times[0]:.1f} ms wall, {cpu[0]:.1f} ms CPU; then median "
        f"{statistics.median(times[1:]):.1f} ms wall (min {min(times[1:]):.1f}, max "
        f"{max(times[1:]):.1f}), {statistics.median(cpu[1:]):.1f} ms CPU, {runs - 1} runs"
    )
    with open("/proc/loadavg") as fh:
        print(f"  load average while measured: {fh.read().split()[0]} (other processes)")
    print(f"  figures: { {p: round(d.median, 4) for p, d in distances.items()} }")
    print(f"  the same reads with O_DIRECT (from the disk, page cache untouched): "
          f"{direct_reads(data, names):.1f} ms")  # fmt: skip


def direct_reads(data: Path, names: list[str]) -> float:
    """Milliseconds for the check's row reads straight from the device: what a cold
    page cache costs, without evicting anything other processes use."""
    import mmap
    import os
    import random
    import zlib

    align = 4096
    buf = mmap.mmap(-1, 1 << 20)
    start = time.perf_counter()
    for role in ("base", "instruct", "new_base"):
        with Checkpoint.open(data / role) as c:
            for name in names:
                t = c.tensors[name]
                rng = random.Random(zlib.crc32(name.encode()))
                for r in sorted(rng.sample(range(t.rows), ROWS)):
                    lo = (t.offset + r * t.row_bytes) // align * align
                    hi = -(-(t.offset + (r + 1) * t.row_bytes) // align) * align
                    fd = os.open(t.file, os.O_RDONLY | os.O_DIRECT)
                    try:
                        os.preadv(fd, [memoryview(buf)[: hi - lo]], lo)
                    finally:
                        os.close(fd)
    return (time.perf_counter() - start) * 1e3


def tiny() -> None:
    from app.demo.tiny import make_triple, write_model

    with tempfile.TemporaryDirectory() as tmp:
        t = make_triple(Path(tmp) / "t")
        other = write_model(Path(tmp) / "other", seed=8, shards=2)
        print(f"tiny random triple: {figures(t.base, instruct=t.instruct, target=t.new_base)}")
        print(f"tiny, another seed as target: {figures(t.base, target=other)}")


def demo(root: Path) -> None:
    import app.demo.train as train

    mine = train.cached_triple(root / "seed42") or train.make_trained_triple(root / "seed42")
    seed, train._SEED = train._SEED, 7  # the same recipe (data, schedule), another init
    try:
        other = train.cached_triple(root / "seed7") or train.make_trained_triple(root / "seed7")
    finally:
        train._SEED = seed
    related = figures(mine.base, instruct=mine.instruct, target=mine.new_base)
    print(f"demo trained triple: {related}")
    print(f"demo, independently trained base as target: {figures(mine.base, target=other.base)}")
    print(f"demo, independently trained new base: {figures(mine.base, target=other.new_base)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "bench/data/1b")
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--demo", type=Path, default=None, help="where the trained triples go")
    a = p.parse_args()
    cost(a.data, a.runs)
    tiny()
    if a.demo is not None:
        demo(a.demo)


if __name__ == "__main__":
    main()
