"""``realign demo``: the whole workflow on tiny trained models, offline, on a CPU."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from app.demo.tiny import TinyTriple
from app.demo.train import cached_triple, make_trained_triple, news_facts
from app.merge import merge


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


def _trained_triple(models: Path, console: Console) -> TinyTriple:
    triple = cached_triple(models)
    if triple is not None:
        console.print(f"reusing the trained tiny models in {models}", soft_wrap=True)
        return triple
    # Anything else there is an older demo's or an interrupted run's: start over.
    shutil.rmtree(models, ignore_errors=True)
    console.print(f"training tiny Llama base / instruct / new_base in {models}", soft_wrap=True)
    console.print("  (once; about a minute on two free cores)")
    return make_trained_triple(models, progress=lambda line: console.print(f"  {line}"))


def run_demo(workdir: Path, *, console: Console, stdout: Console) -> Path:
    """Train (or reuse) a tiny Llama triple under `workdir`, merge it, and chat with the result.

    Args:
        workdir: Holds the trained models, the residual store and the merged model.
        console: Receives progress lines.
        stdout: Receives the result: where the model is, the question, two replies.

    Returns:
        The merged model directory.
    """
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    triple = _trained_triple(workdir / "models", console)
    out = workdir / "merged"
    started = time.perf_counter()
    res = merge(
        str(triple.base),
        str(triple.instruct),
        str(triple.new_base),
        out,
        store=workdir / "store",
        overwrite=True,
    )
    how = "computed" if res.residual_created else "reused from the store"
    took = time.perf_counter() - started
    console.print(f"residual {res.residual_key} ({how}); merge took {took:.2f} s", soft_wrap=True)
    # A question about this month's news: only the new base read it, only the
    # instruct model learned to answer chats.
    question = news_facts()[0].questions()[0]
    prompt = chat_prompt(out, question)
    replies = {
        "merged (new_base + instruct - base):": greedy_reply(out, prompt),
        "new_base alone, same prompt:": greedy_reply(triple.new_base, prompt),
    }
    stdout.print(f"merged model: {out}")
    stdout.print(f"user: {question}")
    for label, reply in replies.items():
        # Verbatim: no colouring of the reply's contents, no line breaks inside it.
        stdout.print(f"{label:<37} {reply!r}", highlight=False, soft_wrap=True)
    return out
