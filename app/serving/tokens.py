"""The served model's tokenizer, chat template and stop tokens — owned by the front end
(vLLM keeps the tokenizer it started with; a swapped-in instruct model brings its own)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRefError


@dataclass
class ServedTokenizer:
    """Tokenizer + chat template + stop ids of one served model."""

    tokenizer: Any
    stop_ids: list[int]

    @classmethod
    def load(cls, directory: Path) -> ServedTokenizer:
        """From a merged model dir, or a residual pack's ``assets/``."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        stops: list[int] = []
        gen = directory / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            stops += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if tok.eos_token_id is not None:
            stops.append(int(tok.eos_token_id))
        return cls(tok, sorted({int(s) for s in stops}))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRefError("this model has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


@dataclass
class Detokenizer:
    """Incremental text for a growing list of ids.

    Decodes only a short window (from ``prefix_offset``) rather than the whole answer on
    every chunk, holds back a trailing partial UTF-8 character, and applies stop strings.
    """

    tok: ServedTokenizer
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the text
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, new_ids: list[int]) -> str:
        """Return the new text to emit (may be empty)."""
        if self.stopped:
            return ""
        self.ids += new_ids
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing printable yet (or half of a multi-byte character)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        before = len(self.sent)
        self.sent += full[len(prefix) :]
        for stop in self.stops:
            cut = self.sent.find(stop, max(0, before - len(stop) + 1))
            if cut != -1:
                self.sent, self.stopped, self.matched = self.sent[:cut], True, stop
        return self.sent[before:]
