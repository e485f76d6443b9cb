"""Functions the task YAMLs of this directory name (``!function hooks.…``): local data
loaders and per-document scoring. lm-eval imports this file by path when it reads a
YAML, so imports of heavy modules stay inside the functions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"

# A reply that opens with a role name on its own (what is left of a role header once
# special tokens are stripped) or with chat-template markup did not start in the
# assistant's turn: the model is writing the template itself.
_ROLE_LINE = re.compile(r"^\s*(system|user|assistant|human|bot|model|ai)\s*(:|\n|$)", re.IGNORECASE)
_MARKUP = re.compile(
    r"^\s*(<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(start|end)_of_turn>|"
    r"###\s*(instruction|response|human|assistant|user)\b)",
    re.IGNORECASE,
)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _split(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def format_docs(**metadata: Any) -> Any:
    """The format suite's chat prompts (``data/format_prompts.jsonl``)."""
    return _split(_jsonl(DATA / "format_prompts.jsonl"))


def ifeval_docs(**metadata: Any) -> Any:
    """The ifeval-lite prompts, in IFEval's schema (``data/ifeval_lite.jsonl``)."""
    return _split(_jsonl(DATA / "ifeval_lite.jsonl"))


def split_text(text: str) -> list[str]:
    """Documents of a text file: its paragraphs (blank-line separated), or its lines
    when it has no blank lines; surrounding whitespace dropped, empty ones skipped."""
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    return [" ".join(p.split()) for p in parts if p.strip()]


def text_docs(*, text_file: str, tokenizer: str, **metadata: Any) -> Any:
    """One document per paragraph of ``text_file``, with the number of tokens the
    model predicts in it (``tokenizer``: the scored model's directory)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    docs = split_text(Path(text_file).read_text(encoding="utf-8"))
    # As lm-eval's hf model encodes for loglikelihood_rolling: no special tokens.
    counts = [len(tok(d, add_special_tokens=False).input_ids) for d in docs]
    return _split([{"text": d, "n_tokens": n} for d, n in zip(docs, counts, strict=True)])


def opens_as_reply(text: str) -> bool:
    """Whether a reply starts as the assistant's turn: not empty, no role header, no
    chat-template markup at its start."""
    return bool(text.strip()) and not (_ROLE_LINE.match(text) or _MARKUP.match(text))


def format_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """A reply conforms when it ended its turn on the chat tokenizer's end-of-sequence
    token within the budget (finish_reason ``stop``, and no other stop token such as a
    base model's end of text) and opens as the assistant's reply."""
    reply = results[0]
    stopped = bool(getattr(reply, "ended_turn", False))
    opened = opens_as_reply(str(reply))
    return {
        "format": float(stopped and opened),
        "stop_rate": float(stopped),
        "open_rate": float(opened),
    }


def ifeval_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """lm-eval's IFEval scoring (strict and loose, per prompt and per instruction)."""
    from app.evals.offline import ifeval_checkers

    ifeval_checkers()  # before lm-eval's scoring module imports them
    from lm_eval.tasks.ifeval import utils

    return dict(utils.process_results(doc, [str(results[0])]))


def ifeval_instruction_mean(items: list[list[bool]]) -> float:
    """Fraction of all instructions followed (IFEval's instruction-level accuracy)."""
    flat = [ok for item in items for ok in item]
    return sum(flat) / len(flat) if flat else 0.0


def perplexity_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """(log-likelihood, tokens) of a document, for a token-weighted perplexity."""
    (loglikelihood,) = results
    return {"token_perplexity": (float(loglikelihood), int(doc["n_tokens"]))}
