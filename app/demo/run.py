"""``realign demo``: the service path on tiny trained models, offline, on a CPU."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from app.core.settings import get_settings
from app.demo.server import DemoError, ServeProcess, chat, follow, free_port
from app.demo.tiny import TinyTriple
from app.demo.train import DEFAULT_STEPS, cached_triple, make_trained_triple, news_facts

MODEL = "demo-news"


def chat_prompt(tokenizer_dir: Path, question: str) -> torch.Tensor:
    """Render one user turn with the chat template of `tokenizer_dir`, ready to generate.

    Args:
        tokenizer_dir: Model directory whose tokenizer has a chat template.
        question: The user's message.

    Returns:
        Input ids of shape `(1, length)`.
    """
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids: torch.Tensor = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids


def greedy_reply(model_dir: Path, prompt_ids: torch.Tensor, max_new_tokens: int = 32) -> str:
    """Greedily continue `prompt_ids` with the model in `model_dir` (transformers, CPU).

    Args:
        model_dir: Model directory; generation stops at its generation config's eos ids.
        prompt_ids: Input ids of shape `(1, length)`.
        max_new_tokens: Upper bound on the reply length.

    Returns:
        The reply with special tokens kept, so it shows where generation stopped.
    """
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # transformers annotates generate's self with a protocol its auto classes miss.
    with torch.no_grad():
        out = model.generate(  # type: ignore[misc]
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0, prompt_ids.shape[1] :]))


def _trained_triple(models: Path, console: Console, steps: int = DEFAULT_STEPS) -> TinyTriple:
    triple = cached_triple(models, steps=steps)
    if triple is not None:
        console.print(f"reusing the trained tiny models in {models}", soft_wrap=True)
        return triple
    # Anything else there is an older demo's or an interrupted run's: start over.
    shutil.rmtree(models, ignore_errors=True)
    console.print(f"training tiny Llama base / instruct / new_base in {models}", soft_wrap=True)
    console.print("  (once; about a minute on two free cores)")
    return make_trained_triple(
        models, steps=steps, progress=lambda line: console.print(f"  {line}")
    )


def _allowed_roots(models: Path) -> dict[str, str]:
    """Extra environment for the server when the demo's models lie outside the allowed
    roots (only with ``--workdir`` elsewhere: by default they are in the store)."""
    settings = get_settings()
    roots = settings.allowed_roots or [settings.models_cache_dir]
    real = Path(os.path.realpath(models))
    if any(real.is_relative_to(os.path.realpath(root)) for root in roots):
        return {}
    return {"REALIGN_ALLOWED_ROOTS": os.pathsep.join(map(str, [*roots, real]))}


def _submit(client: httpx.Client, triple: TinyTriple, console: Console) -> str:
    body = {
        "base": str(triple.base),
        "instruct": str(triple.instruct),
        "target": str(triple.new_base),
        "serve": True,
        "name": MODEL,
    }
    console.print(f"POST /merge {json.dumps(body)}", highlight=False, soft_wrap=True)
    response = client.post("/merge", json=body)
    if response.status_code != 202:
        raise DemoError(f"POST /merge answered {response.status_code}: {response.text}")
    return str(response.json()["id"])


def _merge_and_serve(server: ServeProcess, triple: TinyTriple, console: Console) -> dict[str, Any]:
    """POST /merge with serve=true and follow the job until the model is served."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = follow(client, _submit(client, triple, console), console)
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise DemoError(
                f"job {job['id']} {job['status']} at stage {job.get('stage')}: "
                f"{error.get('message', '')} (server log: {server.log})"
            )
        result: dict[str, Any] = job["result"]
        engines = client.get("/admin/engines")
        kinds = [e["engine"] for e in engines.json()] if engines.status_code == 200 else []
    console.print(
        f"  served as {result['model_id']!r} by the {'/'.join(kinds) or '?'} engine; merged "
        f"model at {result['output']} (residual {result['residual_key'][:12]})",
        highlight=False,
        soft_wrap=True,
    )
    return result


def run_demo(
    workdir: Path,
    *,
    console: Console,
    stdout: Console,
    port: int | None = None,
    steps: int = DEFAULT_STEPS,
    eval_limit: int | None = None,
) -> dict[str, str]:
    """Train (or reuse) a tiny Llama triple under ``workdir``, then go through the service:
    start ``realign serve`` with the environment's settings, ``POST /merge`` with
    ``serve: true``, follow the job, chat with the merged model through the OpenAI SDK,
    then score base, instruct, new_base and the merge on the evaluation suites.

    Args:
        workdir: Holds the trained models and the server's log.
        console: Receives each step.
        stdout: Receives the result: the question and two replies.
        port: The server's port (default: ``REALIGN_PORT`` when free, else any free one).
        steps: Pre-training steps of the tiny base (fewer train faster and learn nothing).
        eval_limit: At most this many examples per evaluation suite (default: all).

    Returns:
        The replies, by label.

    Raises:
        DemoError: a step failed; the message names it and the server's log.
    """
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    triple = _trained_triple(workdir / "models", console, steps)
    port = free_port(port or get_settings().port)
    log = workdir / "serve.log"
    console.print(f"realign serve --port {port}   (default settings; log in {log})", soft_wrap=True)
    started = time.perf_counter()
    with ServeProcess(port, log, _allowed_roots(triple.base.parent)) as server:
        console.print(f"  up at {server.url} in {time.perf_counter() - started:.1f} s")
        result = _merge_and_serve(server, triple, console)
        # A question about this month's news: only the new base read it, only the
        # instruct model learned to answer chats.
        question = news_facts()[0].questions()[0]
        console.print(f"OpenAI SDK: chat.completions.create(model={MODEL!r}, temperature=0)")
        merged = chat(server.url, MODEL, question)
    prompt = chat_prompt(Path(result["output"]), question)
    replies = {
        "merged (new_base + instruct - base):": merged,
        "new_base alone, same prompt:": greedy_reply(triple.new_base, prompt),
    }
    stdout.print(f"user: {question}")
    for label, reply in replies.items():
        # Verbatim: no colouring of the reply's contents, no line breaks inside it.
        stdout.print(f"{label:<37} {reply!r}", highlight=False, soft_wrap=True)
    _evidence(triple, Path(result["output"]), workdir, console, stdout, eval_limit)
    console.print(f"done in {time.perf_counter() - started:.1f} s", highlight=False)
    return replies


def _evidence(
    triple: TinyTriple,
    merged: Path,
    workdir: Path,
    console: Console,
    stdout: Console,
    limit: int | None,
) -> None:
    """Score the four models on the evaluation suites and print the table."""
    from app.demo.scores import print_scores, score_demo
    from app.evals.models import EvalProgress

    def show(p: EvalProgress) -> None:
        if p.message:
            console.print(f"  {p.model}: {p.suite}: {p.message}", highlight=False)

    console.print(
        "evaluating base, instruct, new_base and the merge (realign eval: format, "
        "ifeval-lite, perplexity on the news; one engine, models swapped in turn)",
        soft_wrap=True,
    )
    print_scores(score_demo(triple, merged, workdir, progress=show, limit=limit), stdout)
