"""Merge wall time of one job on 1 vs 2 workers: the merge split by output shard.

Starts a private redis-server and real `realign worker` processes against a store in
a scratch directory, stores the pair's residual once, then times merge jobs applying
it to the new base (submit to `succeeded`, as a client sees it), in interleaved
rounds of:

- ``1 worker, one task``: splitting off (``REALIGN_MERGE_PARALLEL_MIN_SHARDS=0``);
- ``1 worker, split``: the shard tasks one after the other on one worker;
- ``2 workers, split``: the shard tasks on two workers at once.

The merged model is removed between runs (every run writes it). Worker start-up is
not timed. Inputs stay in the page cache after the first round.

    .venv/bin/python bench/parallel.py [--data bench/data/1b] [--runs 3] [--shard-gb 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.settings import Settings  # noqa: E402
from app.jobs.models import Caller, JobStatus, MergeSpec  # noqa: E402
from app.jobs.service import JobService  # noqa: E402
from app.store.local import LocalStore  # noqa: E402

CASES = {"1 worker, one task": (1, 0), "1 worker, split": (1, 2), "2 workers, split": (2, 2)}
ME = Caller(name="bench", role="admin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def env_for(redis_url: str, store: Path, data: Path, shard_gb: float, min_shards: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env.update(
        {
            "REALIGN_REDIS_URL": redis_url,
            "REALIGN_MODELS_CACHE_DIR": str(store),
            "REALIGN_ALLOWED_ROOTS": json.dumps([str(data)]),
            "REALIGN_MAX_SHARD_GB": str(shard_gb),
            "REALIGN_MERGE_PARALLEL_MIN_SHARDS": str(min_shards),
            "REALIGN_LOG_LEVEL": "WARNING",
        }
    )
    return env


def start_workers(n: int, env: dict, logdir: Path, svc: JobService) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        log = (logdir / f"worker{i}.log").open("ab")
        cmd = [sys.executable, "-m", "app.cli", "worker", "--name", f"bench{i}@%h"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    end = time.monotonic() + 120
    while len(svc.workers()) < n:
        if time.monotonic() > end:
            raise SystemExit(f"workers did not start; see {logdir}")
        time.sleep(0.2)
    return procs


def stop_workers(procs: list[subprocess.Popen], svc: JobService) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)
    for w in svc.workers():
        svc.records.forget_worker(w.name)


def one_merge(svc: JobService, spec: MergeSpec, store: LocalStore) -> tuple[float, int]:
    """Seconds from submit to succeeded, and the number of shard tasks."""
    started = time.monotonic()
    rec, _ = svc.submit(spec, ME)
    while not (rec := svc.get(rec.id, ME)).status.terminal:
        time.sleep(0.02)
    took = time.monotonic() - started
    if rec.status != JobStatus.succeeded or rec.result is None:
        raise SystemExit(f"merge {rec.id} {rec.status.value}: {rec.error}")
    split = [e.message for e in svc.events(rec.id, ME) if e.message.startswith("split into")]
    shards = int(split[0].split()[2]) if split else 1
    store.remove(rec.result.merged_key, "merged")
    return took, shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data" / "1b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shard-gb", type=float, default=0.25)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = ap.parse_args()
    data = args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="realign-parallel-", dir=args.work))
    store_dir = work / "store"
    store_dir.mkdir()
    redis, url = start_redis(work)
    try:
        env = env_for(url, store_dir, data, args.shard_gb, 2)
        subprocess.run(
            [sys.executable, "-m", "app.cli", "compute", "-b", str(data / "base"),
             "-i", str(data / "instruct"), "--store", str(store_dir), "--quiet"],
            cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        settings = Settings(
            redis_url=url, models_cache_dir=store_dir, allowed_roots=[data], max_shard_gb=1
        )
        svc, store = JobService.from_settings(settings), LocalStore(store_dir)
        spec = MergeSpec(
            base=str(data / "base"), instruct=str(data / "instruct"), target=str(data / "new_base")
        )
        procs = start_workers(1, env, work, svc)  # warm-up: target hashed, caches filled
        try:
            one_merge(svc, spec, store)
        finally:
            stop_workers(procs, svc)
        times: dict[str, list[float]] = {c: [] for c in CASES}
        shards: dict[str, int] = {}
        for r in range(args.runs):
            for case, (n, min_shards) in CASES.items():
                env = env_for(url, store_dir, data, args.shard_gb, min_shards)
                procs = start_workers(n, env, work, svc)
                try:
                    took, shards[case] = one_merge(svc, spec, store)
                finally:
                    stop_workers(procs, svc)
                times[case].append(took)
                print(f"round {r + 1}: {case}: {took:.2f} s ({shards[case]} task(s))", flush=True)
        report(times, shards, args)
    finally:
        redis.terminate()
        shutil.rmtree(work, ignore_errors=True)


def report(times: dict[str, list[float]], shards: dict[str, int], args: argparse.Namespace) -> None:
    base = statistics.median(times["1 worker, split"])
    print(f"\nApply a stored residual to {args.data.name} (output shards of {args.shard_gb} GB)")
    print("| case | shard tasks | wall s: median (min-max) | vs 1 worker, split |")
    print("|---|---|---|---|")
    for case, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {case} | {shards[case] if shards[case] > 1 else '-'} | "
            f"{med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {med / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
