"""``realign demo``: the whole workflow on generated tiny models, offline, on a CPU."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from app.demo.tiny import make_triple
from app.merge import merge

PROMPT = "Tell me about the weather today."


def greedy_reply(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy chat completion from a model directory with transformers on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(  # type: ignore[misc]
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
    )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def run_demo(workdir: Path, *, console: Console, stdout: Console) -> Path:
    """Build a tiny Llama triple under ``workdir``, merge it, and chat with the result."""
    models = workdir / "models"
    if not (models / "new_base" / "config.json").is_file():
        shutil.rmtree(models, ignore_errors=True)
        console.print(f"building tiny Llama base / instruct / new_base in {models}")
        make_triple(models, family="llama", shards=2)
    out = workdir / "merged"
    started = time.perf_counter()
    res = merge(
        str(models / "base"),
        str(models / "instruct"),
        str(models / "new_base"),
        out,
        store=workdir / "store",
        overwrite=True,
    )
    took = time.perf_counter() - started
    how = "computed" if res.residual_created else "reused from the store"
    console.print(f"residual {res.residual_key} ({how}); merge took {took:.2f} s")
    reply = greedy_reply(out, PROMPT)
    stdout.print(f"merged model: {out}")
    stdout.print(f"user: {PROMPT}")
    stdout.print(f"assistant (greedy, tiny random weights): {reply!r}", highlight=False)
    return out
