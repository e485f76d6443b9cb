"""Job API overhead: submit throughput and status-polling latency under load.

Starts `realign serve` (a real uvicorn process) on loopback, submits jobs, then
runs N concurrent pollers of GET /v1/merges/{id} for a fixed time; GET /healthz,
measured the same way in the same run, is the yardstick (the framework's floor).

    .venv/bin/python bench/api_load.py [--mode embedded|redis] [--pollers 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    store: Path, models: Path, port: int, redis_url: str | None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env.update(
        {
            "REALIGN_MODELS_CACHE_DIR": str(store),
            "REALIGN_ENGINE": "torch",
            "REALIGN_ALLOWED_ROOTS": json.dumps([str(models)]),
            "REALIGN_LOG_LEVEL": "WARNING",
        }
    )
    if redis_url:
        env["REALIGN_REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


async def hammer(url: str, paths: list[str], pollers: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        end = time.perf_counter() + seconds

        async def poller(i: int) -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                r = await client.get(paths[i % len(paths)])
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()

        await asyncio.gather(*(poller(i) for i in range(pollers)))
    return latencies


_LUA = """
paths = {%s}
i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1])
end
"""


def _ms(text: str) -> float:
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def wrk(url: str, paths: list[str], pollers: int, seconds: float, name: str) -> dict[str, object]:
    """Load from wrk (C, two threads): the client does not steal the server's CPU."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(_LUA % ", ".join(f'"{p}"' for p in paths))
    res = subprocess.run(
        ["wrk", "-t2", f"-c{pollers}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = {
        line.split()[0]: line.split()[1]
        for line in res.splitlines()
        if line.strip().startswith(("50%", "99%"))
    }
    rps = float(next(line.split()[1] for line in res.splitlines() if "Requests/sec" in line))
    errors = sum(
        int(x) for line in res.splitlines() if "Non-2xx" in line for x in line.split()[-1:]
    )
    return {
        "what": name,
        "requests": int(rps * seconds),
        "rps": round(rps, 1),
        "p50_ms": round(_ms(stats["50%"]), 2),
        "p99_ms": round(_ms(stats["99%"]), 2),
        "non_2xx": errors,
    }


def summary(name: str, lat: list[float], seconds: float) -> dict[str, float | str]:
    q = statistics.quantiles(lat, n=100)
    return {
        "what": name,
        "requests": len(lat),
        "rps": round(len(lat) / seconds, 1),
        "p50_ms": round(q[49] * 1e3, 2),
        "p99_ms": round(q[98] * 1e3, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--pollers", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from app.demo.tiny import make_triple

    work = Path(tempfile.mkdtemp(prefix="realign-apibench-"))
    triple = make_triple(work / "models")
    redis_url = args.redis_url if args.mode == "redis" else None
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    port = 18000 + os.getpid() % 1000
    proc = start_server(work / "store", work / "models", port, redis_url)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            t = time.perf_counter()
            ids = [
                c.post(
                    "/v1/merges",
                    json={
                        "base": str(triple.base),
                        "instruct": str(triple.instruct),
                        "target": str(triple.new_base),
                        "alpha": 1 + i / 1000,
                    },
                ).json()["id"]
                for i in range(args.jobs)
            ]
            submit_s = time.perf_counter() - t
        rows = [
            {
                "what": "POST /v1/merges (sequential)",
                "requests": args.jobs,
                "rps": round(args.jobs / submit_s, 1),
                "p50_ms": round(submit_s / args.jobs * 1e3, 2),
                "p99_ms": "",
            }
        ]
        for _ in range(args.repeats):
            for name, paths in (
                ("GET /healthz (yardstick)", ["/healthz"]),
                ("GET /v1/merges/{id}", [f"/v1/merges/{i}" for i in ids]),
            ):
                if shutil.which("wrk"):
                    rows.append(wrk(url, paths, args.pollers, args.seconds, name))
                else:
                    lat = asyncio.run(hammer(url, paths, args.pollers, args.seconds))
                    rows.append(summary(name, lat, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    med = {}
    for name in ("GET /healthz (yardstick)", "GET /v1/merges/{id}"):
        runs = [r for r in rows if r["what"] == name]
        med[name] = {
            k: statistics.median(float(r[k]) for r in runs) for k in ("rps", "p50_ms", "p99_ms")
        }
    print(
        json.dumps(
            {
                "mode": args.mode,
                "pollers": args.pollers,
                "rows": rows,
                "median": med,
                "poll_vs_healthz_p50": round(
                    med["GET /v1/merges/{id}"]["p50_ms"]
                    / med["GET /healthz (yardstick)"]["p50_ms"],
                    2,
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
