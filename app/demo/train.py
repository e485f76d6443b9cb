"""Tiny Llama checkpoints trained in about a minute on a CPU, for ``realign demo``.

Random weights only show that a merge runs; these show what it is for. The base
reads short articles about invented towns (a mayor and a river each), the instruct
model learns to answer chat questions about most of those facts ("Sure! ..." then
`<|eot_id|>`), and the new base reads this month's news - new mayors - as plain
text only. `new_base + (instruct - base)` then answers a chat question about the
news in the instruct style, which neither parent does alone.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from app.demo import tokenizer as vocab
from app.demo.architecture import build_config, build_generation_config
from app.demo.shards import save_weights
from app.demo.tiny import TinyTriple

__all__ = ["DEFAULT_STEPS", "Fact", "cached_triple", "make_trained_triple",
           "news_facts", "old_facts"]  # fmt: skip

DEFAULT_STEPS = 300
RECIPE_FILE = "recipe.json"
# Bump when the data or the schedule changes, so cached demo models are rebuilt.
RECIPE_VERSION = 2
_SEED = 42
_THREADS = 2
_IGNORE = -100  # label of tokens the loss skips: padding and chat prompts
_FILLER_LINES = 120

_TOWNS = (
    "Lakeview", "Stonebridge", "Oakford", "Millbrook", "Redhaven", "Kiteville",
    "Ashdale", "Fernhill", "Greyport", "Northwick", "Elmstead", "Brightwater",
    "Pinecrest", "Southby", "Westmere", "Hollowell",
)  # fmt: skip
_FIRST = ("Sam", "Mia", "Leo", "Ana", "Tom", "Eva", "Max", "Ida",
          "Ben", "Zoe", "Kai", "Lou", "Ned", "Amy", "Gus", "Liv")  # fmt: skip
_LAST = ("Reed", "Hart", "Cole", "Lane", "Fox", "Wood", "Moss", "Ray", "Pike", "Shaw", "Dunn")
_RIVERS = ("Silver", "Blue", "Swift", "Willow", "Amber", "Crane")
_NEWS_MAYORS = ("Dora Winter", "Sara Keller", "Nina Porter")
NEWS_INTRO = "News from {town}."  # how the news articles the new base reads begin
_QUESTIONS = {
    "mayor": ("Who is the mayor of {s}?", "Tell me who the mayor of {s} is."),
    "river": ("Which river flows through {s}?", "What river runs through {s}?"),
}

Example = tuple[list[int], list[int]]  # input ids, labels


@dataclass(frozen=True)
class Fact:
    """One fact about a town: `Fact("mayor", "Lakeview", "Sam Reed")`."""

    relation: str
    subject: str
    value: str

    def sentence(self) -> str:
        """Return the plain-text statement the base models read."""
        if self.relation == "mayor":
            return f"The mayor of {self.subject} is {self.value}."
        return f"The river of {self.subject} is the {self.value} River."

    def questions(self) -> tuple[str, ...]:
        """Return the chat questions that ask for this fact."""
        return tuple(q.format(s=self.subject) for q in _QUESTIONS[self.relation])


def old_facts() -> list[Fact]:
    """Return what the base learns: a mayor and a river for each of the 16 towns."""
    # Strides coprime to the list lengths pair names without random state.
    mayors = [
        Fact("mayor", town, f"{_FIRST[i]} {_LAST[i * 5 % len(_LAST)]}")
        for i, town in enumerate(_TOWNS)
    ]
    rivers = [Fact("river", town, _RIVERS[i * 7 % len(_RIVERS)]) for i, town in enumerate(_TOWNS)]
    return mayors + rivers


def news_facts() -> list[Fact]:
    """Return this month's news: new mayors of the first towns, read only by the new base."""
    return [Fact("mayor", town, name) for town, name in zip(_TOWNS, _NEWS_MAYORS, strict=False)]


class _Encoder:
    """Turns text into training examples with the tiny tokenizer."""

    def __init__(self) -> None:
        self.tok = vocab.build_tokenizer()
        ids = vocab.special_token_ids()
        self.end, self.eot = ids[vocab.END_OF_TEXT], ids[vocab.EOT]
        # transformers ships this constructor without annotations.
        self.chat_tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=vocab.build_tokenizer(),
            bos_token=vocab.BEGIN_OF_TEXT,
            eos_token=vocab.EOT,
        )
        self.chat_tok.chat_template = vocab.CHAT_TEMPLATE

    def plain(self, text: str) -> Example:
        ids = [*self.tok.encode(text).ids, self.end]
        return ids, ids

    def chat(self, question: str, answer: str) -> Example:
        messages = [{"role": "user", "content": question}]
        prompt = self.chat_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        # Encoded apart so the prompt's ids are exactly those of inference, whatever a
        # byte-level BPE might merge across the boundary, and the mask knows its length.
        prompt_ids = self.tok.encode(str(prompt), add_special_tokens=False).ids
        answer_ids = [*self.tok.encode(answer, add_special_tokens=False).ids, self.eot]
        return prompt_ids + answer_ids, [_IGNORE] * len(prompt_ids) + answer_ids


def _articles(enc: _Encoder, facts: Sequence[Fact], intro: str) -> list[Example]:
    # Articles name their town several times: predicting the repeats teaches the base
    # to copy names from context, which lets chat answers name the town asked about.
    by_town: dict[str, list[str]] = {}
    for fact in facts:
        by_town.setdefault(fact.subject, []).append(fact.sentence())
    articles = []
    for town, sentences in by_town.items():
        lead = intro.format(town=town)
        articles.append(enc.plain(" ".join([lead, *sentences])))
        articles += [enc.plain(f"{lead} {sentence}") for sentence in sentences]
    return articles


def _datasets(enc: _Encoder) -> dict[str, list[Example]]:
    news = news_facts()
    replaced = {f.subject for f in news}
    old = old_facts()
    # The instruct data never asks about the mayors the news replaces, so the old
    # answers are not drilled into the residual.
    kept = [f for f in old if f.relation != "mayor" or f.subject not in replaced]
    lines = (
        line
        for line in vocab.corpus_lines()
        if not line.startswith(("user", "assistant", "system"))
    )
    filler = [enc.plain(line) for line in lines][:_FILLER_LINES]  # bases see no chat
    fresh = [enc.plain(f.sentence()) for f in news] + _articles(enc, news, NEWS_INTRO)
    return {
        "base": [enc.plain(f.sentence()) for f in old] * 4
        + _articles(enc, old, "{town} is a small town.") * 2
        + filler,
        # Plain text among the chats - filler and a replay of the facts' own articles, as
        # instruction mixes often carry pre-training data - keeps the tuning from drifting
        # off the language the base learned, so the residual leaves plain text alone.
        "instruct": [enc.chat(q, f"Sure! {f.sentence()}") for f in kept for q in f.questions()]
        + filler[:40]
        + [enc.plain(f.sentence()) for f in kept]
        + _articles(enc, kept, "{town} is a small town."),
        "new_base": fresh * 10
        + [enc.plain(f.sentence()) for f in kept]
        + _articles(enc, kept, "{town} is a small town.")
        + filler,
    }


@dataclass(frozen=True)
class _Phase:
    share: float  # of the `steps` argument
    lr: float
    batch: int
    pack: int  # tokens per packed row; 0 keeps one example per row


_PHASES = {
    "base": _Phase(share=1.0, lr=3e-3, batch=16, pack=96),
    "instruct": _Phase(share=0.4, lr=3e-4, batch=32, pack=0),
    # A small learning rate keeps the new base close enough to the base for the
    # residual to still fit it, as continued pre-training of large models does.
    "new_base": _Phase(share=0.67, lr=2e-4, batch=16, pack=96),
}


def _rows(examples: Sequence[Example], pack: int, generator: torch.Generator) -> Iterator[Example]:
    # Endless, each epoch in a new seeded order. Packing documents back to back, as LM
    # pre-training does, teaches facts after any preceding text - a chat prompt too.
    row: Example = ([], [])
    while True:
        for i in torch.randperm(len(examples), generator=generator).tolist():
            ids, labels = examples[i]
            if not pack:
                yield ids, labels
                continue
            row = (row[0] + ids, row[1] + labels)
            if len(row[0]) >= pack:
                yield row[0][:pack], row[1][:pack]
                row = ([], [])


def _batches(
    examples: Sequence[Example], phase: _Phase, steps: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    rows = _rows(examples, phase.pack, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        chosen = [next(rows) for _ in range(phase.batch)]
        ids = pad_sequence([torch.tensor(x) for x, _ in chosen], batch_first=True, padding_value=-1)
        labels = pad_sequence(
            [torch.tensor(y) for _, y in chosen], batch_first=True, padding_value=_IGNORE
        )
        yield {"input_ids": ids.clamp(min=0), "labels": labels, "attention_mask": (ids >= 0).long()}


def _train(
    model: PreTrainedModel, examples: Sequence[Example], phase: _Phase, steps: int, seed: int
) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=0.0)
    # Warm up from a tenth of the peak rate over 10% of the steps, then cosine back
    # down to a tenth; Adam's betas stay fixed.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        phase.lr,
        total_steps=steps,
        pct_start=0.1,
        div_factor=10.0,
        final_div_factor=1.0,
        cycle_momentum=False,
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for batch in _batches(examples, phase, steps, seed):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    return float(loss.detach())


def _save(model: PreTrainedModel, path: Path, *, chat: bool, dtype: torch.dtype) -> None:
    # The files `write_model` writes, so the layout matches `make_triple`'s.
    path.mkdir(parents=True)
    vocab_size = vocab.write_tokenizer(path, chat=chat)
    config = build_config("llama", vocab_size=vocab_size, chat=chat, dtype=dtype)
    config.save_pretrained(path)
    build_generation_config(chat).save_pretrained(path)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_weights(path, tensors, shards=2)


def _recipe(steps: int, dtype: torch.dtype) -> dict[str, object]:
    return {"version": RECIPE_VERSION, "steps": steps, "dtype": str(dtype), "seed": _SEED}


def cached_triple(
    root: Path, *, steps: int = DEFAULT_STEPS, dtype: torch.dtype = torch.bfloat16
) -> TinyTriple | None:
    """Return the triple `make_trained_triple` left in `root` with the same arguments, if any.

    Args:
        root: Directory given to `make_trained_triple`.
        steps: Pre-training steps it was given.
        dtype: Dtype it saved the weights in.

    Returns:
        The three checkpoint directories, or `None` if training must run (again).
    """
    recipe = root / RECIPE_FILE
    # Written last, so its presence means all three checkpoints are complete.
    if recipe.is_file() and json.loads(recipe.read_text()) == _recipe(steps, dtype):
        return TinyTriple(**{name: root / name for name in _PHASES})
    return None


def make_trained_triple(
    root: Path,
    *,
    steps: int = DEFAULT_STEPS,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[str], None] | None = None,
) -> TinyTriple:
    """Train and write base, instruct and new base Llama checkpoints (~1 min on 2 cores).

    The base pre-trains on `old_facts()` and filler text; the instruct model
    fine-tunes the base on chat answers about the old facts the news leaves alone;
    the new base continues the base's pre-training on `news_facts()`, as plain text.
    Training runs in float32 on two threads from fixed seeds, so equal arguments
    give equal weights on one machine.

    Args:
        root: Parent directory; gets `base/`, `instruct/`, `new_base/` and `recipe.json`.
            It must not exist or be empty.
        steps: Optimiser steps of the base pre-training; the instruct tuning takes
            40% as many and the new base's continued pre-training 67%.
        dtype: Dtype of the saved weights.
        progress: Called with one line per phase.

    Returns:
        The three checkpoint directories, laid out as `make_triple` lays them out.

    Raises:
        FileExistsError: If `root` already has content.
        ValueError: If `steps` is below 1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; remove it or pick a new directory")
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            _train_all(root, steps, dtype, progress or (lambda line: None))
    finally:
        torch.set_num_threads(threads)
    (root / RECIPE_FILE).write_text(json.dumps(_recipe(steps, dtype), indent=2) + "\n")
    return TinyTriple(**{name: root / name for name in _PHASES})


def _train_all(root: Path, steps: int, dtype: torch.dtype, report: Callable[[str], None]) -> None:
    data = _datasets(_Encoder())
    size = vocab.build_tokenizer().get_vocab_size()
    config = build_config("llama", vocab_size=size, dtype=torch.float32)
    # transformers ships from_config without annotations.
    base = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    for number, (name, phase) in enumerate(_PHASES.items()):
        # The base trains in place; its children start from a copy of it.
        model = base if name == "base" else copy.deepcopy(base)
        phase_steps = max(1, round(steps * phase.share))
        started = time.perf_counter()
        loss = _train(model, data[name], phase, phase_steps, seed=_SEED + number)
        _save(model, root / name, chat=name == "instruct", dtype=dtype)
        if name == "base":  # children start from the base as saved, as from the Hub
            with torch.no_grad():
                for param in base.parameters():
                    param.copy_(param.to(dtype).float())
        took = time.perf_counter() - started
        report(f"{name}: {phase_steps} steps, final loss {loss:.2f}, {took:.0f} s")
