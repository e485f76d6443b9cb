"""Merge wall time of one job on 1 vs 2 workers: the merge split by output shard, with
the store the workers share on local disk or in an object store.

Starts a private redis-server and real `realign worker` processes, stores the pair's
residual once, then times merge jobs applying it to the new base (submit to
`succeeded`, as a client sees it), in interleaved rounds of:

- ``1 worker, one task`` (the yardstick): splitting off
  (``REALIGN_MERGE_PARALLEL_MIN_SHARDS=0``);
- ``1 worker, split``: the shard tasks one after the other on one worker;
- ``2 workers, split``: the shard tasks on two workers at once.

``--store local``: one store directory for every worker (a shared file system).
``--store object``: the store is ``s3://bench/realign`` on an S3 server on loopback
(a process of its own: moto, or with ``--s3rver DIR`` the Node.js s3rver, which moves
bytes several times faster than moto); every worker has a node cache of its own, empty at
each run (nodes that have not seen the pack or the target), and the target is an
``s3://`` model in the bucket (a local path is not split on an object store). The
figures compare cases of one store with each other: the medians over the yardstick's
of the same run, never absolute seconds across machines.

The merged model is removed between runs (every run writes it). Worker start-up is
not timed.

    .venv/bin/python bench/parallel.py [--data bench/data/1b] [--store local|object|both]
        [--runs 3] [--shard-gb 0.25] [--s3rver DIR]
    # s3rver once: npm install --prefix bench/data/s3rver s3rver@3.7.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.settings import Settings  # noqa: E402
from app.jobs.models import Caller, JobStatus, MergeSpec  # noqa: E402
from app.jobs.service import JobService  # noqa: E402
from app.merge import compute  # noqa: E402
from app.store.base import Store  # noqa: E402
from app.store.factory import store_from_settings  # noqa: E402

CASES = {"1 worker, one task": (1, 0), "1 worker, split": (1, 2), "2 workers, split": (2, 2)}
YARDSTICK = "1 worker, one task"
ME = Caller(name="bench", role="admin")
# s3rver knows one key pair; moto takes any
S3_ENV = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
          "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
FETCHED = re.compile(r"\(([\d.]+) MB of inputs fetched\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, what: str) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start on port {port}")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def start_s3(workdir: Path, s3rver: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    """An S3 server on loopback in a process of its own: moto (it keeps and copies
    objects in Python), or s3rver (Node.js, objects in files) from ``s3rver``, a
    directory where ``npm install s3rver@3.7.1`` was run."""
    port = free_port()
    log = (workdir / "s3.log").open("ab")
    if s3rver is None:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    else:
        script = s3rver / "node_modules" / "s3rver" / "bin" / "s3rver.js"
        (workdir / "s3").mkdir()
        cmd = ["node", str(script), "-d", str(workdir / "s3"), "-a", "127.0.0.1",
               "-p", str(port), "--silent"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **S3_ENV})
    wait_port(port, "the S3 server")
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class Shared:
    """How the workers of one store mode share the store."""

    name: str
    env: dict[str, str]  # every worker's
    settings: Settings  # the API node's (submits, polls, removes the model)
    spec: MergeSpec
    nodes: Path | None = None  # object store: each worker's cache is made under here

    def worker_env(self, base: dict[str, str], tag: str) -> dict[str, str]:
        env = {**base, **self.env}
        if self.nodes is not None:  # a fresh node: nothing cached
            env["REALIGN_MODELS_CACHE_DIR"] = str(self.nodes / tag)
        return env


def local_mode(work: Path, url: str, data: Path, shard_gb: float) -> Shared:
    store = work / "store"
    store.mkdir()
    settings = Settings(
        redis_url=url, models_cache_dir=store, allowed_roots=[data], max_shard_gb=shard_gb
    )
    res = compute(str(data / "base"), str(data / "instruct"), settings=settings)
    env = {"REALIGN_MODELS_CACHE_DIR": str(store)}
    return Shared(
        "local", env, settings, MergeSpec(residual=res.key, target=str(data / "new_base"))
    )


def object_mode(work: Path, url: str, data: Path, endpoint: str, shard_gb: float) -> Shared:
    import boto3

    os.environ.update({k: v for k, v in S3_ENV.items() if k not in os.environ})
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    src = data / "new_base"
    for p in sorted(src.iterdir()):
        client.upload_file(str(p), "bench", f"models/new_base/{p.name}")
    store_url = "s3://bench/realign"
    settings = Settings(
        redis_url=url, models_cache_dir=work / "api-node", allowed_roots=[data],
        store_url=store_url, s3_endpoint_url=endpoint, max_shard_gb=shard_gb,
    )  # fmt: skip
    res = compute(str(data / "base"), str(data / "instruct"), settings=settings)
    env = {"REALIGN_STORE_URL": store_url, "REALIGN_S3_ENDPOINT_URL": endpoint, **S3_ENV}
    spec = MergeSpec(residual=res.key, target="s3://bench/models/new_base")
    return Shared("object", env, settings, spec, nodes=work / "nodes")


def base_env(redis_url: str, data: Path, shard_gb: float, min_shards: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env.update(
        {
            "REALIGN_REDIS_URL": redis_url,
            "REALIGN_ALLOWED_ROOTS": json.dumps([str(data)]),
            "REALIGN_MAX_SHARD_GB": str(shard_gb),
            "REALIGN_MERGE_PARALLEL_MIN_SHARDS": str(min_shards),
            "REALIGN_LOG_LEVEL": "WARNING",
        }
    )
    return env


def start_workers(envs: list[dict[str, str]], logdir: Path, svc: JobService) -> list:
    procs = []
    for i, env in enumerate(envs):
        log = (logdir / f"worker{i}.log").open("ab")
        cmd = [sys.executable, "-m", "app.cli", "worker", "--name", f"bench{i}@%h"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    end = time.monotonic() + 120
    while len(svc.workers()) < len(envs):
        if time.monotonic() > end:
            raise SystemExit(f"workers did not start; see {logdir}")
        time.sleep(0.2)
    return procs


def stop_workers(procs: list, svc: JobService) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)
    for w in svc.workers():
        svc.records.forget_worker(w.name)


@dataclass(frozen=True)
class Run:
    seconds: float
    shards: int  # shard tasks (1: one task)
    fetched_mb: float  # inputs the shard tasks fetched, summed
    final_s: float  # last shard recorded -> job succeeded: the final task (0: one task)


def one_merge(svc: JobService, spec: MergeSpec, store: Store) -> Run:
    """Submit, wait for ``succeeded``, remove the model again."""
    started = time.monotonic()
    rec, _ = svc.submit(spec, ME)
    while not (rec := svc.get(rec.id, ME)).status.terminal:
        time.sleep(0.02)
    took = time.monotonic() - started
    if rec.status != JobStatus.succeeded or rec.result is None:
        raise SystemExit(f"merge {rec.id} {rec.status.value}: {rec.error}")
    events = svc.events(rec.id, ME)
    split = [e.message for e in events if e.message.startswith("split into")]
    fetched = sum(float(m.group(1)) for e in events if (m := FETCHED.search(e.message)))
    written = [e.at for e in events if " written by " in e.message]
    final = (rec.finished_at - max(written)).total_seconds() if written and rec.finished_at else 0
    store.remove(rec.result.merged_key, "merged")
    return Run(took, int(split[0].split()[2]) if split else 1, fetched, final)


def bench_store(mode: Shared, url: str, data: Path, args: argparse.Namespace, work: Path) -> dict:
    svc, store = JobService.from_settings(mode.settings), store_from_settings(mode.settings)
    runs: dict[str, list[Run]] = {c: [] for c in CASES}
    for r in range(args.runs + 1):  # round 0 warms the page cache and is not counted
        for case, (n, min_shards) in CASES.items():
            base = base_env(url, data, args.shard_gb, min_shards)
            envs = [mode.worker_env(base, f"r{r}-{n}w-{min_shards}-{i}") for i in range(n)]
            procs = start_workers(envs, work, svc)
            try:
                run = one_merge(svc, mode.spec, store)
            finally:
                stop_workers(procs, svc)
                if mode.nodes is not None:
                    shutil.rmtree(mode.nodes, ignore_errors=True)
            if r:
                runs[case].append(run)
            what = f"round {r}{' (warm-up)' if not r else ''}: {mode.name}: {case}"
            print(f"{what}: {run.seconds:.2f} s ({run.shards} task(s))", flush=True)
    return runs


def report(name: str, runs: dict[str, list[Run]], args: argparse.Namespace) -> None:
    yard = statistics.median(r.seconds for r in runs[YARDSTICK])
    print(f"\n{name} store: stored residual applied to {args.data.name}, shards of "
          f"{args.shard_gb} GB, median of {args.runs}")  # fmt: skip
    print(
        "| case | shard tasks | wall s: median (min-max) | / one task | final task s "
        "| inputs the shard tasks fetched, MB |"
    )
    print("|---|---|---|---|---|---|")
    for case, rs in runs.items():
        ts = [r.seconds for r in rs]
        med = statistics.median(ts)
        fetched = statistics.median(r.fetched_mb for r in rs)
        final = statistics.median(r.final_s for r in rs)
        split = rs[0].shards > 1
        print(
            f"| {case} | {rs[0].shards if split else '-'} | {med:.2f} "
            f"({min(ts):.2f}-{max(ts):.2f}) | {med / yard:.2f} | "
            f"{f'{final:.2f}' if split else '-'} | {f'{fetched:.0f}' if split else '-'} |"
        )
    one = statistics.median(r.seconds for r in runs["1 worker, split"])
    two = statistics.median(r.seconds for r in runs["2 workers, split"])
    print(f"2 workers / 1 worker, both split: {two / one:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data" / "1b")
    ap.add_argument("--store", choices=("local", "object", "both"), default="both")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shard-gb", type=float, default=0.25)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument(
        "--s3rver",
        type=Path,
        default=None,
        help="object store on s3rver from this npm directory (default: moto)",
    )
    args = ap.parse_args()
    data = args.data.resolve()
    work = Path(tempfile.mkdtemp(prefix="realign-parallel-", dir=args.work))
    procs = []
    try:
        redis, url = start_redis(work)
        procs.append(redis)
        modes = []
        if args.store in ("local", "both"):
            modes.append(lambda: local_mode(work, url, data, args.shard_gb))
        if args.store in ("object", "both"):
            s3, endpoint = start_s3(work, args.s3rver)
            procs.append(s3)
            modes.append(lambda: object_mode(work, url, data, endpoint, args.shard_gb))
        results = {}
        for make in modes:
            mode = make()
            results[mode.name] = bench_store(mode, url, data, args, work)
        for name, runs in results.items():
            report(name, runs, args)
    finally:
        for p in procs:
            p.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
