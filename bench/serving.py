"""Serving benchmark on the vLLM CPU build.

    .venv/bin/python bench/serving.py            # ~6 min on a quiet 2-core machine

Writes the tables to ``bench/SERVING.md`` (keeping its hand-written ``## Findings``) and
every measured figure to ``bench/data/serving-work/raw.json``. ``--help`` lists the knobs
(runs, server starts, concurrency levels, requests, max_tokens, quiet waits).

1. hot swap (``VllmEngine.reload``) vs a cold engine start, both until the first token;
2. in-engine merge (``reload_merged``) vs ``app.merge.apply`` to disk + ``reload``;
3. our API vs vLLM's own OpenAI server on the same merged model: N concurrent streamed
   chats (TTFT, latency, tokens/s), one server at a time.

The model is a synthetic ~100M-parameter bf16 Llama triple (hidden 768, 16 layers, head
dim 64, 512-token vocabulary to match the demo tokenizer) made by ``gen_checkpoints.py``
in ``bench/data/serving``, served in float32 as the vLLM tests do. Parts 1-2 run the
engine in this process; part 3 starts ``realign serve`` and vLLM's server as child
processes and drives them from here. CPU used by other processes during each part is
counted from ``/proc/stat`` minus this process tree, and reported with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gen_checkpoints as gen
import httpx
import psutil
from measure import TICK, _busy_ticks

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv" / "bin"
SHAPE = {"HIDDEN": 768, "INTERMEDIATE": 2048, "HEADS": 12, "KV_HEADS": 4, "VOCAB": 512}
VLLM = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}
KV_BYTES = 64 << 20
MAX_LEN = 256
QUIET = 0.5  # cores used by other processes under which a measurement counts as quiet
QUESTION = [{"role": "user", "content": "Tell me a long story about the old farmer."}]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# -- measuring ------------------------------------------------------------------------------
class TreeCpu:
    """CPU seconds of this process tree, sampled every half second: vLLM force-kills its
    engine core at shutdown, so the worker under it dies unreaped and its time would
    otherwise never reach this process's ``children`` counters."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.total()
            time.sleep(0.5)

    def total(self) -> float:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            with self._lock:
                self._seen[key] = t.user + t.system
        with self._lock:
            return sum(self._seen.values())


_TREE: list[TreeCpu] = []  # started on first use: vLLM's spawned children import this module


def tree_cpu() -> float:
    if not _TREE:
        _TREE.append(TreeCpu())
    return _TREE[0].total()


@dataclass
class Load:
    """Other processes' CPU (cores) over a part, and the 1-minute load average around it."""

    name: str
    t0: float = field(default_factory=time.monotonic)
    busy0: int = field(default_factory=_busy_ticks)
    ours0: float = field(default_factory=tree_cpu)
    avg0: float = field(default_factory=lambda: os.getloadavg()[0])
    others: float = 0.0
    avg1: float = 0.0

    def stop(self) -> Load:
        wall = time.monotonic() - self.t0
        busy = (_busy_ticks() - self.busy0) / TICK
        self.others = max(0.0, busy - (tree_cpu() - self.ours0)) / wall
        self.avg1 = os.getloadavg()[0]
        return self


def wait_quiet(max_load: float, max_wait: float) -> None:
    """Wait until the 1-minute load average is under ``max_load`` (at most ``max_wait`` s)."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)
    print(f"  load average {os.getloadavg()[0]:.2f}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


# -- data -----------------------------------------------------------------------------------
def prepare(data: Path, work: Path) -> tuple[Path, Path]:
    """The triple (generated once) and its bf16 residual pack."""
    if not (data / "info.json").is_file():
        for name, value in SHAPE.items():
            setattr(gen, name, value)
        gen.generate(data, 1.0e8, shard_gb=1.0, seed=0)
    from app.merge import compute

    res = compute(str(data / "base"), str(data / "instruct"), store=work / "store")
    return data, res.path


# -- parts 1 and 2: in-place swaps -----------------------------------------------------------
PROBE = [0, 5, 6, 7]


async def timed(step: Callable[[], Awaitable[object]], engine: Any) -> tuple[float, float]:
    """(seconds for ``step``, seconds for ``step`` + one greedy token after it)."""
    from app.engines.base import GenerationRequest

    t0 = time.perf_counter()
    await step()
    t1 = time.perf_counter()
    async for _ in engine.generate(GenerationRequest(PROBE, 1, 0.0)):
        pass
    return t1 - t0, time.perf_counter() - t0


async def swaps(engine: Any, a: Path, b: Path, count: int) -> list[tuple[float, float]]:
    """``reload`` A, B, A...: every swap moves all weights."""
    return [
        await timed(lambda j=j: engine.reload(a if j % 2 == 0 else b), engine) for j in range(count)
    ]


async def merges(engine: Any, pack: Path, target: Path, work: Path, runs: int) -> dict[str, list]:
    """In-engine merge vs ``apply`` to disk + ``reload``, same alpha back to back; the
    greedy tokens after both must agree."""
    from app.engines.base import InlineMerge
    from app.merge import apply

    r: dict[str, list] = {"inline": [], "disk": [], "apply": [], "agree": []}
    for j in range(runs):
        alpha = 1.0 - 0.25 * j
        merge = InlineMerge(pack, target, alpha)
        r["inline"].append(await timed(lambda m=merge: engine.reload_merged(m), engine))
        want = await engine.probe(PROBE)
        out = work / f"merged-{j}"
        t0 = time.perf_counter()
        apply(str(pack), str(target), out, alpha=alpha, store=work / "store")
        r["apply"].append(time.perf_counter() - t0)
        step, first = await timed(lambda o=out: engine.reload(o), engine)
        r["disk"].append((r["apply"][-1] + step, r["apply"][-1] + first))
        r["agree"].append(await engine.probe(PROBE) == want)
        shutil.rmtree(out)
    return r


async def engine_parts(data: Path, pack: Path, work: Path, runs: int) -> dict[str, list]:
    """``runs`` cold starts on B; the first engine also runs the swaps and the merges."""
    from app.engines.vllm import VllmEngine, _engine_classes

    _engine_classes()  # vLLM's import is paid once per process, not by each start
    a, b = data / "base", data / "new_base"
    r: dict[str, list] = {"cold": [], "close": []}
    for i in range(runs):
        extra = {"kv_cache_memory_bytes": KV_BYTES}
        engine = VllmEngine(b, max_model_len=MAX_LEN, extra_args=extra, **VLLM)  # type: ignore[arg-type]
        r["cold"].append(await timed(engine.start, engine))
        print(f"  cold start {i}: {r['cold'][-1][1]:.2f} s", flush=True)
        if i == 0:
            r["swap"] = await swaps(engine, a, b, runs + 1)
            r.update(await merges(engine, pack, b, work, runs))
            print(f"  swap {r['swap']}\n  inline {r['inline']}\n  disk {r['disk']}", flush=True)
        t0 = time.perf_counter()
        await engine.close()
        r["close"].append(time.perf_counter() - t0)
    return r


# -- part 3: our API vs vLLM's OpenAI server ---------------------------------------------------
@dataclass
class Reply:
    ttft: float
    latency: float
    tokens: int
    text: str


async def chat(client: httpx.AsyncClient, model: str, max_tokens: int) -> Reply:
    """One streamed chat; TTFT is the first chunk with text (both servers send an empty
    role chunk first)."""
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, text = float("nan"), 0, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if choice["delta"].get("content"):
                    if not text:
                        ttft = time.perf_counter() - t0
                    text.append(choice["delta"]["content"])
    return Reply(ttft, time.perf_counter() - t0, tokens, "".join(text))


@dataclass
class Wave:
    """``n`` concurrent requests: their replies, wall time, front-end process CPU."""

    n: int
    wall: float
    replies: list[Reply]
    frontend_cpu: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.replies) / self.wall


def _own_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def drive(url: str, pid: int, sizes: list[int], requests: int, max_tokens: int) -> list[Wave]:
    """Waves of N concurrent streams for each N in ``sizes``, about ``requests`` requests
    (at least 3 waves) per N, after one warm-up wave of the largest N."""
    waves = []
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(chat(client, "bench", max_tokens) for _ in range(max(sizes))))
        for n in sizes:
            for _ in range(max(3, -(-requests // n))):
                cpu0, t0 = _own_cpu(pid), time.perf_counter()
                replies = await asyncio.gather(
                    *(chat(client, "bench", max_tokens) for _ in range(n))
                )
                waves.append(Wave(n, time.perf_counter() - t0, replies, _own_cpu(pid) - cpu0))
    return waves


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``url`` answers 200 (the server process must stay alive)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_ours(data: Path, work: Path, port: int, log: Path) -> tuple[subprocess.Popen, Path, str]:
    """``realign serve`` (embedded mode) with a merge job that has ``serve=true``; returns
    the process, the merged model directory, and how long the job took."""
    env = {
        **OFFLINE,
        "REALIGN_MODELS_CACHE_DIR": str(work / "store"),
        "REALIGN_ENGINE": "vllm",
        "REALIGN_VLLM_ARGS": json.dumps({**VLLM, "kv_cache_memory_bytes": KV_BYTES}),
        "REALIGN_ENGINE_MAX_MODEL_LEN": str(MAX_LEN),
        "REALIGN_ENGINE_WAIT_S": "300",
        "REALIGN_ALLOWED_ROOTS": json.dumps([str(data)]),
        "REALIGN_LOG_LEVEL": "WARNING",
    }
    cmd = [str(VENV / "realign"), "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, 120)
    body = {
        "base": str(data / "base"),
        "instruct": str(data / "instruct"),
        "target": str(data / "new_base"),
        "serve": True,
        "name": "bench",
    }
    t0, merged = time.monotonic(), float("nan")
    job = httpx.post(f"{url}/v1/merges", json=body, timeout=30).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        job = httpx.get(f"{url}/v1/merges/{job['id']}", timeout=30).json()
        if job["stage"] == "load" and merged != merged:
            merged = time.monotonic() - t0
    if job["status"] != "succeeded":
        stop(proc)
        raise RuntimeError(f"merge job {job['status']}: {job.get('error')}")
    took = time.monotonic() - t0
    how = f"{took:.1f} s (merge {merged:.1f} s, then engine start {took - merged:.1f} s)"
    return proc, Path(job["result"]["output"]), how


def serve_vllm(model: Path, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's own OpenAI server on the same merged directory, same engine settings."""
    cmd = [
        *(str(VENV / "python"), "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model), "--served-model-name", "bench", "--dtype", VLLM["dtype"]),
        *("--enforce-eager", "--max-model-len", str(MAX_LEN)),
        *("--max-num-seqs", str(VLLM["max_num_seqs"]), "--kv-cache-memory-bytes", str(KV_BYTES)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"),
    ]
    proc = subprocess.Popen(cmd, env=OFFLINE, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return proc, f"{wait_http(f'http://127.0.0.1:{port}/v1/models', proc, 300):.1f} s"


async def api_part(data: Path, work: Path, args: argparse.Namespace) -> tuple[dict, list[Load]]:
    """Our server and vLLM's, one at a time, in ABBA order for ``--pairs`` > 1."""
    from measure import wait_quiet as wait_cpu

    waves: dict[str, list[Wave]] = {"ours": [], "vllm": []}
    starts: dict[str, list[str]] = {"ours": [], "vllm": []}
    loads, merged, log = [], None, work / "servers.log"
    order = [
        k for i in range(args.pairs) for k in (("ours", "vllm") if i % 2 == 0 else ("vllm", "ours"))
    ]
    for i, kind in enumerate(order):
        wait_cpu(QUIET, args.quiet_wait)
        port = args.port + i
        load = Load(f"part 3: {kind}")
        if kind == "ours":
            proc, merged, ready = serve_ours(data, work, port, log)
        else:
            assert merged is not None
            proc, ready = serve_vllm(merged, port, log)
        starts[kind].append(ready)
        print(f"  {kind}: servable after {ready}", flush=True)
        try:
            url = f"http://127.0.0.1:{port}"
            waves[kind] += await drive(url, proc.pid, args.sizes, args.requests, args.max_tokens)
        finally:
            stop(proc)
        loads.append(load.stop())
    return {"waves": waves, "starts": starts, "model": merged}, loads


# -- report ---------------------------------------------------------------------------------
def machine() -> str:
    import platform

    import torch
    import transformers
    import vllm

    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split(":", 1)[1]
    mem = psutil.virtual_memory().total / 1024**3
    return (
        f"{cpu.splitlines()[0].strip()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; "
        f"Linux {platform.release()}; Python {platform.python_version()}; vLLM "
        f"{vllm.__version__} (CPU build); torch {torch.__version__}; transformers "
        f"{transformers.__version__}"
    )


ENGINE_ROWS = (
    ("cold", "cold start on B: `VllmEngine(B)` + `start()`", "fresh engine processes"),
    ("swap", "hot swap: `reload(A or B)` in place", "A and B alternately, one engine"),
    ("inline", "in-engine merge: `reload_merged(InlineMerge(pack, B, alpha))`", "no checkpoint"),
    ("disk", "merge to disk + load: `apply(pack, B, out, alpha)` + `reload(out)`", "see below"),
)


def engine_table(r: dict[str, list]) -> list[str]:
    lines = [
        "| what | step (s) | until first token (s) | each run, until first token (s) | notes |",
        "|---|---:|---:|---|---|",
    ]
    for key, name, note in ENGINE_ROWS:
        step, first = (median([p[i] for p in r[key]]) for i in (0, 1))
        runs = ", ".join(f"{p[1]:.2f}" for p in r[key])
        lines.append(f"| {name} | {step:.2f} | {first:.2f} | {runs} | {note} |")
    cold, swap, inline, disk = (median([p[1] for p in r[k]]) for k, _, _ in ENGINE_ROWS)
    closes = ", ".join(f"{c:.2f}" for c in r["close"])
    agree = "agree" if all(r["agree"]) else "DISAGREE"
    return [
        *lines,
        "",
        f"- **Hot swap vs cold start: {cold / swap:.0f}x faster** until the first token "
        f"({swap:.2f} s vs {cold:.2f} s, medians).",
        f"- **In-engine merge vs merge to disk + load: {disk / inline:.2f}x** "
        f"({inline:.2f} s vs {disk:.2f} s; above 1 = in-engine is faster). `apply` alone: "
        f"{median(r['apply']):.2f} s; the `reload` after it: "
        f"{median([d[1] - a for d, a in zip(r['disk'], r['apply'], strict=True)]):.2f} s.",
        f"- The greedy tokens after the in-engine and the on-disk merge {agree} at every alpha.",
        f"- `close()` of an engine: {median(r['close']):.2f} s (runs: {closes}).",
    ]


def server_stats(waves: list[Wave]) -> list[float]:
    """TTFT p50/p99 (ms), latency p50/p99 (s), tokens/s, front-end CPU ms/token."""
    rs = [r for w in waves for r in w.replies]
    ttft, lat = [r.ttft * 1e3 for r in rs], [r.latency for r in rs]
    cpu = sum(w.frontend_cpu for w in waves) * 1e3 / max(1, sum(r.tokens for r in rs))
    rate = median([w.tokens_per_s for w in waves])
    return [pct(ttft, 50), pct(ttft, 99), pct(lat, 50), pct(lat, 99), rate, cpu]


def api_table(res: dict, sizes: list[int]) -> list[str]:
    lines = [
        "| N | server | requests | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (s) "
        "| latency p99 (s) | tokens/s | tokens/request | front-end CPU (ms/token) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for n in sizes:
        stats = {}
        for kind, label in (("ours", "Realign API"), ("vllm", "vLLM direct")):
            waves = [w for w in res["waves"][kind] if w.n == n]
            s = stats[kind] = server_stats(waves)
            counts = "/".join(map(str, sorted({r.tokens for w in waves for r in w.replies})))
            reqs = sum(len(w.replies) for w in waves)
            lines.append(
                f"| {n} | {label} | {reqs} | {s[0]:.0f} | {s[1]:.0f} | {s[2]:.2f} | {s[3]:.2f} "
                f"| {s[4]:.1f} | {counts} | {s[5]:.2f} |"
            )
        ratio = [f"{a / b:.2f}" for a, b in zip(stats["ours"], stats["vllm"], strict=True)]
        lines.append(f"| {n} | **ours / vLLM** | | {' | '.join(ratio[:5])} | | {ratio[5]} |")
    return lines


def same_text(res: dict) -> str:
    texts = {k: {r.text for w in res["waves"][k] for r in w.replies} for k in ("ours", "vllm")}
    if texts["ours"] == texts["vllm"] and len(texts["ours"]) == 1:
        return "every reply of both servers is the same text (greedy, same weights)"
    ours, theirs = len(texts["ours"]), len(texts["vllm"])
    return f"replies differ: {ours} distinct texts from ours, {theirs} from vLLM"


def write_report(out: Path, args: argparse.Namespace, info: dict) -> None:
    """Rewrite ``out``; a hand-written section from ``## Findings`` on is kept."""
    kept = ""
    if out.is_file() and "\n## Findings" in out.read_text():
        kept = out.read_text()[out.read_text().index("\n## Findings") :]
    loads = "\n".join(
        f"| {ld.name} | {ld.avg0:.2f} | {ld.avg1:.2f} | {ld.others:.2f} "
        f"| {'yes' if ld.others < QUIET else '**no**'} |"
        for ld in info["loads"]
    )
    eng = {**VLLM, "max_model_len": MAX_LEN, "kv_cache_memory_bytes": KV_BYTES}
    api = info["api"]
    text = f"""# Serving benchmark (vLLM CPU build)

Written by `bench/serving.py` on {time.strftime("%Y-%m-%d %H:%M")} in {info["wall"] / 60:.1f} min.
Sections from `## Findings` on are kept when the file is rewritten.

```sh
{" ".join([".venv/bin/python bench/serving.py", *sys.argv[1:]])}
```

- **Machine:** {info["machine"]}.
- **Model:** synthetic Llama, {info["params"] / 1e6:.0f}M parameters (hidden 768, 16 layers,
  12 heads / 4 KV heads of 64, MLP 2048, vocabulary 512), bf16 on disk (203 MB), served in
  float32. A = `base`, B = `new_base`, residual pack = `instruct - base` (bf16).
- **Engine settings (all engines and both servers):** `{json.dumps(eng)}`.
- **Runs:** parts 1-2: {args.runs} cold starts, {args.runs + 1} swaps, {args.runs} merges of each
  kind (alpha 1.0, 0.75, 0.5...); medians. Part 3: {args.pairs} start(s) of each server in
  ABBA order, one at a time; per N, waves of N concurrent streamed chats
  (`max_tokens` {args.max_tokens}, temperature 0), at least 3 waves and about {args.requests}
  requests per N per start, after one unrecorded warm-up wave. p99 of this few samples is
  close to the worst request.

### Load during the measurements

1-minute load average when each part started and ended, and the cores that *other*
processes used on average during it (`/proc/stat` busy time minus this process tree).

| part | load avg at start | load avg at end | other processes (cores) | quiet (< {QUIET}) |
|---|---:|---:|---:|---|
{loads}

## 1-2. Hot swap vs cold start; in-engine merge vs merge to disk + load

Engine-level (`app.engines.vllm.VllmEngine` in this process); "first token" = one greedy
token generated after the step.

{chr(10).join(engine_table(info["engine"]))}

## 3. Front-end overhead: Realign API vs vLLM's OpenAI server

Streamed `/v1/chat/completions` over loopback (httpx, one client process). Ours:
`realign serve` (embedded mode) with `REALIGN_ENGINE=vllm`, the model served by a merge
job with `serve: true`; vLLM: `python -m vllm.entrypoints.openai.api_server` on the same
merged directory. TTFT = time to the first chunk carrying text. tokens/s = all tokens of a
wave / its wall time. Front-end CPU = CPU time of the server's main process (HTTP,
tokenizer, detokenizer, vLLM client; not the engine core) per generated token.
Servable after: ours (merge job with `serve: true`, submit to succeeded)
{"; ".join(api["starts"]["ours"])}; vLLM (process start to `/v1/models` answering)
{"; ".join(api["starts"]["vllm"])}.
Check: {same_text(api)}.

{chr(10).join(api_table(api, args.sizes))}
"""
    out.write_text(text + kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="cold starts / merges of each kind")
    ap.add_argument("--pairs", type=int, default=2, help="starts of each server in part 3")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=8, help="requests per N per server start")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for this load average")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="longest wait for quiet, s, before each part / server",
    )
    ap.add_argument("--port", type=int, default=18700)
    ap.add_argument("--data", type=Path, default=HERE / "data" / "serving")
    ap.add_argument("--out", type=Path, default=HERE / "SERVING.md")
    args = ap.parse_args()
    t0 = time.monotonic()
    work = args.data.with_name(args.data.name + "-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data, pack = prepare(args.data, work)
    print("parts 1-2: engine swaps and merges", flush=True)
    wait_quiet(args.max_load, args.quiet_wait)
    load = Load("parts 1-2: engine")
    engine = asyncio.run(engine_parts(data, pack, work, args.runs))
    loads = [load.stop()]
    print("part 3: API vs vLLM direct", flush=True)
    api, api_loads = asyncio.run(api_part(data, work, args))
    info = {
        "machine": machine(),
        "params": json.loads((data / "info.json").read_text())["params"],
        "engine": engine,
        "api": api,
        "loads": loads + api_loads,
        "wall": time.monotonic() - t0,
    }
    write_report(args.out, args, info)
    raw = {"engine": engine, "waves": {k: [asdict(w) for w in v] for k, v in api["waves"].items()}}
    (work / "raw.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {args.out} ({info['wall'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
