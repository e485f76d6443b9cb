"""Evaluation speed on the demo models, with the engine the settings choose (vLLM CPU).

    .venv/bin/python bench/evals.py --write     # ~15 min on a quiet 2-core machine

1. the demo suite (what ``realign demo`` ends with): format, ifeval-lite and news
   perplexity of base, instruct, new_base and the merge, one engine started for them,
   as wall time (engine start included) and per part; median of ``--runs``;
2. generation requests/s of the format and ifeval-lite suites on the instruct model
   (lm-eval's chat client -> Realign's OpenAI route -> engine), at 1 and ``--concurrency``
   requests in flight, against the engine's own throughput on the same prompts (chat
   template applied, same budget, greedy) driven directly at the same concurrency.

Prints a markdown section and writes every figure to ``bench/data/evals-work/raw.json``;
``--write`` puts the section into ``bench/RESULTS.md`` (replacing an earlier one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app.demo.scores import MAX_TOKENS, score_demo  # noqa: E402
from app.demo.train import cached_triple, make_trained_triple  # noqa: E402
from app.evals.endpoint import Endpoint, Served  # noqa: E402
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, SuiteName  # noqa: E402
from app.evals.runner import evaluate_model  # noqa: E402
from app.evals.suites import DATA  # noqa: E402

WORK = HERE / "data" / "evals-work"
SECTION = "## Evaluation speed (issue: evidence with every merge)"
GENERATION = (SuiteName.chat_format, SuiteName.ifeval_lite)


def demo_models() -> tuple[Any, Path]:
    """The trained demo triple (``bench/data/demo``, trained once) and its merge."""
    from app.merge import merge

    root = HERE / "data" / "demo"
    triple = cached_triple(root) or make_trained_triple(root)
    merged = WORK / "merged"
    if not (merged / "config.json").is_file():
        merge(str(triple.base), str(triple.instruct), str(triple.new_base), merged,
              no_cache=True, store=WORK / "store", overwrite=True)  # fmt: skip
    return triple, merged


def demo_suite(triple: Any, merged: Path, runs: int) -> list[dict[str, Any]]:
    """Wall time of the whole demo suite, its engine start, and each suite's seconds."""
    out = []
    for run in range(runs):
        marks: dict[str, float] = {}

        def mark(p: EvalProgress, marks: dict[str, float] = marks) -> None:
            marks.setdefault(p.message, time.perf_counter())

        started = time.perf_counter()
        result = score_demo(triple, merged, WORK / f"demo-{run}", progress=mark)
        wall = time.perf_counter() - started
        engine = next((t for m, t in marks.items() if m.startswith("up at")), started) - started
        suites = {
            s: sum(scores[s].seconds for scores in result.scores.values())
            for s in ("format", "ifeval-lite", "perplexity")
        }
        out.append({"wall_s": wall, "engine_start_s": engine, "suite_s": suites})
        print(f"demo suite run {run}: {wall:.1f} s (engine start {engine:.1f} s)", flush=True)
    return out


def eval_rates(model: Path, concurrency: list[int], runs: int) -> dict[str, Any]:
    """Requests/s of the generation suites through the served route, per concurrency."""
    rates: dict[str, Any] = {}
    with Endpoint({"instruct": Served(model)}, WORK / "engine.log") as endpoint:
        target = EvalTarget(model="instruct", base_url=endpoint.base_url)
        for c in concurrency:
            spec = EvalSpec(suites=GENERATION, max_tokens=MAX_TOKENS, concurrency=c)
            for _ in range(runs):
                scores = evaluate_model(target, spec)
                for suite in GENERATION:
                    score = scores[suite]
                    key = f"{suite}@{c}"
                    rates.setdefault(key, []).append(
                        {"rps": score.requests_per_s, "n": score.n, "suite_s": score.seconds}
                    )
            print(f"eval at concurrency {c}: {rates[f'format@{c}']}", flush=True)
    return rates


def _prompts(name: str) -> list[str]:
    lines = (DATA / name).read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


async def _engine_rates(model: Path, concurrency: list[int], runs: int) -> dict[str, Any]:
    from app.core.settings import get_settings
    from app.engines.base import GenerationRequest
    from app.engines.factory import factory_from_settings
    from app.serving.tokens import ServedTokenizer

    tok = ServedTokenizer.load(model)
    engine = factory_from_settings(get_settings())(model)
    await engine.start()
    rates: dict[str, Any] = {}
    try:
        for suite, data in zip(
            GENERATION, ("format_prompts.jsonl", "ifeval_lite.jsonl"), strict=True
        ):
            prompts = [tok.chat_prompt([{"role": "user", "content": p}]) for p in _prompts(data)]
            for c in concurrency:
                gate = asyncio.Semaphore(c)

                async def one(ids: list[int], gate: asyncio.Semaphore = gate) -> int:
                    request = GenerationRequest(ids, max_tokens=MAX_TOKENS, temperature=0.0,
                                                stop_token_ids=tok.stop_ids)  # fmt: skip
                    async with gate:
                        return sum([len(c.token_ids) async for c in engine.generate(request)])

                for _ in range(runs):
                    started = time.perf_counter()
                    tokens = await asyncio.gather(*(one(p) for p in prompts))
                    took = time.perf_counter() - started
                    rates.setdefault(f"{suite}@{c}", []).append(
                        {"rps": len(prompts) / took, "tokens_s": sum(tokens) / took}
                    )
    finally:
        await engine.close()
    return rates


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def section(raw: dict[str, Any]) -> str:
    demo, evals, engine = raw["demo"], raw["eval"], raw["engine"]
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python bench/evals.py --write` ({raw['runs']} runs, medians; load "
        f"average {raw['load'][0]:.1f} / {raw['load'][1]:.1f} before / after; engine: "
        f"{raw['engine_kind']}, default settings). The demo's trained models, replies of at "
        f"most {MAX_TOKENS} tokens.",
        "",
        "| demo suite (4 models: format 40 + ifeval-lite 42 prompts, news + general "
        "perplexity) | seconds |",
        "|---|---:|",
        f"| wall time, one engine started for the four | {median(demo, 'wall_s'):.1f} |",
        f"| of which the engine start | {median(demo, 'engine_start_s'):.1f} |",
    ]
    for suite in ("format", "ifeval-lite", "perplexity"):
        value = statistics.median(r["suite_s"][suite] for r in demo)
        lines.append(f"| {suite}, the four models together | {value:.1f} |")
    lines += [
        "",
        "| instruct model, generation | in flight | eval requests/s | engine requests/s "
        "| eval / engine |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in evals:
        suite, c = key.split("@")
        ours, theirs = median(evals[key], "rps"), median(engine[key], "rps")
        lines.append(f"| {suite} | {c} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    one, many = raw["concurrency"][0], raw["concurrency"][-1]
    gains = [
        median(evals[f"{s}@{many}"], "rps") / median(evals[f"{s}@{one}"], "rps")
        for s in ("format", "ifeval-lite")
    ]
    gain = f"{min(gains):.1f}" + (
        f"-{max(gains):.1f}" if f"{max(gains):.1f}" != f"{min(gains):.1f}" else ""
    )
    start = median(demo, "engine_start_s") / median(demo, "wall_s")
    lines += [
        "",
        f"With {many} requests in flight the generation suites answer {gain}x the requests/s "
        f"of one at a time. One at a time the evaluation keeps pace with the engine; at "
        f"{many} in flight each request's HTTP round trip, JSON, chat template and lm-eval's "
        "bookkeeping take a share the engine's own batching does not pay. The engine start "
        f"is {start:.0%} of the demo suite's wall time (every model after the first is "
        "swapped into the running engine). Other processes shared the two cores (load "
        f"average up to {max(raw['load']):.1f}): read the ratios rather than the absolute "
        "figures.",
    ]
    return "\n".join(lines) + "\n"


def write(text: str) -> None:
    results = HERE / "RESULTS.md"
    body = results.read_text()
    if SECTION in body:
        start = body.index(SECTION)
        end = body.find("\n## ", start + len(SECTION))
        body = body[:start] + text + (body[end + 1 :] if end != -1 else "")
    else:
        body = body.rstrip("\n") + "\n\n" + text
    results.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight.")
    parser.add_argument("--write", action="store_true", help="Update bench/RESULTS.md.")
    parser.add_argument(
        "--from-raw", action="store_true", help="Only remake the section from raw.json."
    )
    args = parser.parse_args()
    if args.from_raw:
        text = section(json.loads((WORK / "raw.json").read_text()))
        print(text)
        if args.write:
            write(text)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    triple, merged = demo_models()
    levels = sorted({1, args.concurrency})
    raw: dict[str, Any] = {"runs": args.runs, "concurrency": levels}
    raw["demo"] = demo_suite(triple, merged, args.runs)
    raw["eval"] = eval_rates(triple.instruct, levels, args.runs)
    raw["engine"] = asyncio.run(_engine_rates(triple.instruct, levels, args.runs))
    from app.core.settings import get_settings
    from app.engines.factory import vllm_installed

    kind = get_settings().engine
    raw["engine_kind"] = ("vllm" if vllm_installed() else "torch") if kind == "auto" else kind
    raw["load"] = (load, os.getloadavg()[0])
    (WORK / "raw.json").write_text(json.dumps(raw, indent=2))
    text = section(raw)
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
