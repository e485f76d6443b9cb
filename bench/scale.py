"""Scale on paper: wall time of a shard-parallel merge of a 70B and a 405B model on
N = 1..64 workers, from the per-worker figures measured in bench/RESULTS.md and the
object-store, network and Redis figures of a cluster given as parameters.

    python bench/scale.py                      # markdown table, defaults below
    python bench/scale.py --store-gbps 40 --nic-gbit 100 --mode apply --every

The model. A merge writes S = ceil(output / max shard) output shards; each is one Celery
task. Workers take shards in waves of at most N; a shard streams its inputs from the
object store (through the node's cache disk), merges, and uploads its output, so its
time is the slowest of: the merge math (measured output GB/s of one worker), the cache
disk (measured durable write bandwidth), the worker's NIC, and its share of the object
store's aggregate bandwidth (shared by the shards of the wave). Then one final task
writes the index, manifest and model card from the shards' digests (no re-read of the
output): a fixed cost plus a small cost per shard. Redis carries task messages, chord
counters, progress and heartbeats: its load is counted against its capacity.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# bench/RESULTS.md, 1.1B bf16 triple (2.2 GB per checkpoint), inputs in page cache:
# wall seconds per mode, bytes read and written in units of one checkpoint.
MEASURED_WALL_S = {"fused": 2.33, "first": 4.79, "apply": 2.22}
MEASURED_OUT_GB = 2.2
MEASURED_DISK_GBPS = 1.82  # O_DIRECT + fsync write bandwidth of the benchmark machine
MEASURED_RSS_GB = 0.33  # peak RSS of a merge, flat in model size
IO = {"fused": (3, 1), "first": (3, 2), "apply": (2, 1)}  # (reads, writes) per output byte
MODES = tuple(IO)


@dataclass(frozen=True)
class Cluster:
    """Figures of the cluster and of one worker (GB = 1e9 bytes)."""

    worker_gbps: float  # output GB/s one worker merges when nothing else limits it
    disk_gbps: float  # a worker's cache disk, GB/s
    nic_gbps: float  # a worker's network, GB/s
    store_gbps: float  # object store aggregate bandwidth, GB/s (reads + writes)
    shard_gb: float = 5.0  # REALIGN_MAX_SHARD_GB
    task_overhead_s: float = 2.0  # queue pickup, headers, manifest writes of one shard
    final_s: float = 5.0  # final task: index, manifest, model card, commit marker
    final_per_shard_s: float = 0.02  # final task: one digest/HEAD per shard
    redis_ops_per_s: float = 50_000.0  # a single Redis, small commands
    progress_hz: float = 1.0  # progress writes per running shard per second


@dataclass(frozen=True)
class Estimate:
    wall_s: float
    bound: str  # what limits the busiest wave
    redis_load: float  # peak share of Redis capacity used


def shard_time(c: Cluster, mode: str, out_gb: float, concurrent: int) -> tuple[float, str]:
    """Seconds one shard of ``out_gb`` takes with ``concurrent`` shards in flight."""
    reads, writes = IO[mode]
    moved = out_gb * (reads + writes)
    limits = {
        "merge math": out_gb / c.worker_gbps,
        "cache disk": moved / c.disk_gbps,
        "worker NIC": moved / c.nic_gbps,
        "object-store bandwidth": moved / (c.store_gbps / concurrent),
    }
    bound = max(limits, key=lambda k: limits[k])
    return limits[bound] + c.task_overhead_s, bound


def estimate(c: Cluster, mode: str, params: float, workers: int) -> Estimate:
    """Wall time of one merge of a ``params``-parameter bf16 model on ``workers``, and
    what keeps more workers from making it faster."""
    out_gb = params * 2 / 1e9
    shards = math.ceil(out_gb / c.shard_gb)
    sizes = [c.shard_gb] * (shards - 1) + [out_gb - c.shard_gb * (shards - 1)]
    waves = [sizes[i : i + workers] for i in range(0, shards, workers)]
    timed = [max(shard_time(c, mode, gb, len(wave)) for gb in wave) for wave in waves]
    final = c.final_s + c.final_per_shard_s * shards
    wall = sum(t for t, _ in timed) + final
    in_flight = len(waves[0])
    redis = (in_flight * (c.progress_hz + 0.1) + 8 * shards / wall) / c.redis_ops_per_s
    if redis >= 1:
        bound = "Redis"
    elif final >= wall / 2:
        bound = "final index task"
    elif workers >= shards:
        bound = "shard count"
    else:
        bound = timed[0][1]
    return Estimate(wall, bound, redis)


def knee(c: Cluster, mode: str, params: float, top: int = 64) -> tuple[int, Estimate]:
    """The fewest workers within 5% of the best wall time on 1..top workers."""
    runs = {n: estimate(c, mode, params, n) for n in range(1, top + 1)}
    best = min(r.wall_s for r in runs.values())
    n = min(n for n, r in runs.items() if r.wall_s <= best * 1.05)
    return n, runs[n]


def fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 600 else f"{s:.0f} s"


def table(c: Cluster, mode: str, models: dict[str, float], ns: list[int]) -> str:
    head = "| workers | " + " | ".join(f"{m} wall | {m} speedup | {m} bound" for m in models)
    rows = [head + " |", "|---" * (1 + 3 * len(models)) + "|"]
    one = {m: estimate(c, mode, p, 1).wall_s for m, p in models.items()}
    for n in ns:
        cells = []
        for m, p in models.items():
            e = estimate(c, mode, p, n)
            cells += [fmt_s(e.wall_s), f"{one[m] / e.wall_s:.1f}x", e.bound]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def store_saturation(c: Cluster, mode: str) -> float:
    """Workers whose shards, each at full speed, use the object store's whole bandwidth."""
    reads, writes = IO[mode]
    moved = c.shard_gb * (reads + writes)
    alone = max(c.shard_gb / c.worker_gbps, moved / c.disk_gbps, moved / c.nic_gbps)
    return c.store_gbps / (moved / (alone + c.task_overhead_s))


def summary(c: Cluster, mode: str, models: dict[str, float]) -> list[str]:
    sat = store_saturation(c, mode)
    lines = [
        f"- The object store saturates at ~{sat:.1f} workers ({c.store_gbps:g} GB/s over "
        "the per-worker demand): past that, more workers only split the same bandwidth.",
    ]
    for m, p in models.items():
        shards = math.ceil(p * 2 / 1e9 / c.shard_gb)
        n, e = knee(c, mode, p)
        final = c.final_s + c.final_per_shard_s * shards
        lines.append(
            f"- {m} ({p * 2 / 1e9:.0f} GB out, {shards} shards of {c.shard_gb:g} GB, so at "
            f"most {shards} workers busy): within 5% of its best time from **{n} workers** "
            f"({fmt_s(e.wall_s)}), limited by the {e.bound}. Final index task "
            f"{final:.1f} s ({final / e.wall_s:.0%} of that); Redis at {e.redis_load:.2%} "
            "of its capacity."
        )
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mode",
        choices=MODES,
        default="first",
        help="first: residual + model written in one pass (3 reads, 2 writes); "
        "apply: a stored residual onto a new base (2 reads, 1 write); fused: no "
        "residual kept (3 reads, 1 write)",
    )
    p.add_argument(
        "--worker-gbps",
        type=float,
        default=None,
        help="output GB/s of one worker (default: bench/RESULTS.md for the mode)",
    )
    p.add_argument("--disk-gbps", type=float, default=MEASURED_DISK_GBPS)
    p.add_argument("--nic-gbit", type=float, default=25.0, help="per worker, Gbit/s")
    p.add_argument(
        "--store-gbps", type=float, default=10.0, help="object store aggregate bandwidth, GB/s"
    )
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--redis-ops", type=float, default=50_000.0)
    p.add_argument("--every", action="store_true", help="one row per N = 1..64")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    a = parse(argv)
    c = Cluster(
        worker_gbps=a.worker_gbps or MEASURED_OUT_GB / MEASURED_WALL_S[a.mode],
        disk_gbps=a.disk_gbps,
        nic_gbps=a.nic_gbit / 8,
        store_gbps=a.store_gbps,
        shard_gb=a.shard_gb,
        redis_ops_per_s=a.redis_ops,
    )
    models = {"70B": 70e9, "405B": 405e9}
    ns = list(range(1, 65)) if a.every else [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    out = [
        f"Mode `{a.mode}`; worker {c.worker_gbps:.2f} GB/s of output, cache disk "
        f"{c.disk_gbps:g} GB/s, NIC {a.nic_gbit:g} Gbit/s, object store {c.store_gbps:g} "
        f"GB/s, shards of {c.shard_gb:g} GB, bf16; memory per worker "
        f"~{MEASURED_RSS_GB:g} GB RSS whatever the model.",
        "",
        table(c, a.mode, models, ns),
        "",
        *summary(c, a.mode, models),
    ]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
