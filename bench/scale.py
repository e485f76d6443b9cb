"""Scale on paper: wall time of a shard-parallel merge of a 70B and a 405B model on
N = 1..64 workers sharing an object store, from the per-worker figures measured in
bench/RESULTS.md and the object-store, network and Redis figures of a cluster given
as parameters.

    python bench/scale.py                      # markdown table, defaults below
    python bench/scale.py --store-gbps 40 --nic-gbit 100 --copy-gbps 8 --every

The model follows what the code does (app/jobs/fanout.py and the modules it uses):

1. Pin (one node, serial): the job's ``s3://`` target is downloaded whole and hashed
   to pin its content (``first``: instruct and base too).
2. ``first`` only (one node, serial): the residual pack is computed and published
   (hashed, uploaded, copied into place on the server).
3. Shard tasks, in waves of at most N: each fetches, whole, the pack files and the
   target files its output shard reads (pack files are cut like the output: about one
   shard's bytes; target files are the checkpoint's own, so on average a shard's bytes
   plus one target file), then merges, then uploads its shard. Fetch, math and upload
   run one after the other; fetch and upload share the worker's NIC, its cache disk
   and its share of the object store's bandwidth with the other shards of the wave.
4. Final task: headers only; every shard is copied twice on the server (into the
   model's staging prefix, then into place), at the store's server-side copy rate,
   then index, manifest, card and commit marker. No weight byte passes through it.

Redis carries task messages, chord counters, progress and heartbeats: its load is
counted against its capacity.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# bench/RESULTS.md, 1.1B bf16 triple (2.2 GB per checkpoint), inputs in page cache.
MEASURED_APPLY_S = 2.22  # apply of a stored residual: the shard tasks' math
MEASURED_OUT_GB = 2.2
MEASURED_DISK_GBPS = 1.82  # O_DIRECT + fsync write bandwidth of the benchmark machine
MEASURED_SHA_GBPS = 1.8  # sha256 of one core
MEASURED_RSS_GB = 0.33  # peak RSS of a merge, flat in model size
PINNED = {"apply": 1, "first": 3}  # checkpoints the pin downloads and hashes
MODES = tuple(PINNED)


@dataclass(frozen=True)
class Cluster:
    """Figures of the cluster and of one worker (GB = 1e9 bytes)."""

    worker_gbps: float  # output GB/s one worker merges when nothing else limits it
    disk_gbps: float  # a worker's cache disk, GB/s
    nic_gbps: float  # a worker's network, GB/s
    store_gbps: float  # object store aggregate bandwidth to clients, GB/s
    copy_gbps: float = 5.0  # server-side copy rate the final task gets
    hash_cores: int = 8  # cores hashing the pinned inputs (one file per core)
    shard_gb: float = 5.0  # REALIGN_MAX_SHARD_GB
    target_file_gb: float = 5.0  # safetensors files of the target checkpoint
    task_overhead_s: float = 2.0  # queue pickup, headers, manifest writes of one shard
    final_s: float = 5.0  # final task: headers, index, manifest, card, marker
    final_per_shard_s: float = 0.05  # final task: a HEAD and two copy requests per shard
    redis_ops_per_s: float = 50_000.0  # a single Redis, small commands
    progress_hz: float = 2.0  # progress writes per running shard per second


@dataclass(frozen=True)
class Estimate:
    wall_s: float
    bound: str  # what keeps more workers from making it faster
    phases: dict[str, float]  # seconds of each phase
    redis_load: float  # peak share of Redis capacity used


def shard_time(c: Cluster, out_gb: float, concurrent: int) -> tuple[float, str]:
    """Seconds one shard of ``out_gb`` takes with ``concurrent`` shards in flight, and
    what limits it."""
    fetched = out_gb + out_gb + c.target_file_gb  # pack files + target files touched
    links = {
        "cache disk": c.disk_gbps,
        "worker NIC": c.nic_gbps,
        "object-store bandwidth": c.store_gbps / concurrent,
    }
    link = min(links, key=lambda k: links[k])
    moving = (fetched + out_gb) / links[link]  # fetch whole files, upload the shard
    math_s = out_gb / c.worker_gbps
    bound = link if moving >= math_s else "merge math"
    return moving + math_s + c.task_overhead_s, bound


def serial_phases(c: Cluster, mode: str, out_gb: float) -> dict[str, float]:
    """The phases one node runs alone, before and after the shard tasks."""
    link = min(c.disk_gbps, c.nic_gbps, c.store_gbps)
    pinned = PINNED[mode] * out_gb
    phases = {"input pin": pinned / link + pinned / (MEASURED_SHA_GBPS * c.hash_cores)}
    if mode == "first":  # compute the pack (2 reads, 1 write, like apply), publish it
        publish = out_gb / MEASURED_SHA_GBPS + out_gb / link + out_gb / c.copy_gbps
        phases["residual"] = out_gb / c.worker_gbps + publish
    shards = math.ceil(out_gb / c.shard_gb)
    phases["final copies"] = c.final_s + c.final_per_shard_s * shards + 2 * out_gb / c.copy_gbps
    return phases


def estimate(c: Cluster, mode: str, params: float, workers: int) -> Estimate:
    """Wall time of one merge of a ``params``-parameter bf16 model on ``workers``, and
    what keeps more workers from making it faster."""
    out_gb = params * 2 / 1e9
    shards = math.ceil(out_gb / c.shard_gb)
    sizes = [c.shard_gb] * (shards - 1) + [out_gb - c.shard_gb * (shards - 1)]
    waves = [sizes[i : i + workers] for i in range(0, shards, workers)]
    timed = [max(shard_time(c, gb, len(wave)) for gb in wave) for wave in waves]
    phases = {**serial_phases(c, mode, out_gb), "shard tasks": sum(t for t, _ in timed)}
    wall = sum(phases.values())
    in_flight = len(waves[0])
    redis = (in_flight * (c.progress_hz * 3 + 0.1) + 8 * shards / wall) / c.redis_ops_per_s
    serial = max((k for k in phases if k != "shard tasks"), key=lambda k: phases[k])
    if redis >= 1:
        bound = "Redis"
    elif phases[serial] >= phases["shard tasks"]:
        bound = serial
    elif workers >= shards:
        bound = "shard count"
    else:
        bound = timed[0][1]
    return Estimate(wall, bound, phases, redis)


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


def summary(c: Cluster, mode: str, models: dict[str, float]) -> list[str]:
    lines = []
    for m, p in models.items():
        shards = math.ceil(p * 2 / 1e9 / c.shard_gb)
        n, e = knee(c, mode, p)
        parts = ", ".join(f"{k} {fmt_s(v)}" for k, v in e.phases.items())
        lines.append(
            f"- {m} ({p * 2 / 1e9:.0f} GB out, {shards} shards of {c.shard_gb:g} GB, so at "
            f"most {shards} workers busy): within 5% of its best time from **{n} workers** "
            f"({fmt_s(e.wall_s)}: {parts}), limited by the {e.bound}. Redis at "
            f"{e.redis_load:.2%} of its capacity."
        )
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mode",
        choices=MODES,
        default="apply",
        help="apply: a stored residual onto an s3:// target; first: the pair's residual "
        "is computed (and published) by the merge task first",
    )
    p.add_argument("--worker-gbps", type=float, default=MEASURED_OUT_GB / MEASURED_APPLY_S)
    p.add_argument("--disk-gbps", type=float, default=MEASURED_DISK_GBPS)
    p.add_argument("--nic-gbit", type=float, default=25.0, help="per worker, Gbit/s")
    p.add_argument("--store-gbps", type=float, default=10.0, help="aggregate, GB/s")
    p.add_argument(
        "--copy-gbps",
        type=float,
        default=None,
        help="server-side copy rate of the final task, GB/s (default: half the store's "
        "bandwidth, each copied byte being read and written inside the store)",
    )
    p.add_argument("--shard-gb", type=float, default=5.0)
    p.add_argument("--target-file-gb", type=float, default=5.0)
    p.add_argument("--redis-ops", type=float, default=50_000.0)
    p.add_argument("--every", action="store_true", help="one row per N = 1..64")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    a = parse(argv)
    c = Cluster(
        worker_gbps=a.worker_gbps,
        disk_gbps=a.disk_gbps,
        nic_gbps=a.nic_gbit / 8,
        store_gbps=a.store_gbps,
        copy_gbps=a.copy_gbps or a.store_gbps / 2,
        shard_gb=a.shard_gb,
        target_file_gb=a.target_file_gb,
        redis_ops_per_s=a.redis_ops,
    )
    models = {"70B": 70e9, "405B": 405e9}
    ns = list(range(1, 65)) if a.every else [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    out = [
        f"Mode `{a.mode}`; worker {c.worker_gbps:.2f} GB/s of output, cache disk "
        f"{c.disk_gbps:g} GB/s, NIC {a.nic_gbit:g} Gbit/s, object store {c.store_gbps:g} "
        f"GB/s, server-side copies {c.copy_gbps:g} GB/s, output shards of {c.shard_gb:g} GB, "
        f"target files of {c.target_file_gb:g} GB, bf16; memory per worker "
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
