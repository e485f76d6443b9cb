"""Incremental detokenization: chunks add up to the full decode; stop strings cut."""

from __future__ import annotations

import random

from app.demo.tiny import TinyTriple
from app.serving.tokens import Detokenizer, ServedTokenizer


def test_chunks_add_up_to_the_full_text(llama_triple: TinyTriple) -> None:
    tok = ServedTokenizer.load(llama_triple.instruct)
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(0, 512) for _ in range(rng.randrange(1, 80))]
        detok, out, i = Detokenizer(tok, []), "", 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            out += detok.push(ids[i : i + step])
            i += step
        full = tok.decode(ids)
        # all of it, except a trailing half character that is held back
        assert out == full or (full.endswith("\ufffd") and full.startswith(out))


def test_stop_strings_cut_the_text(llama_triple: TinyTriple) -> None:
    tok = ServedTokenizer.load(llama_triple.instruct)
    detok = Detokenizer(tok, ["the"])
    text = "".join(detok.push([i]) for i in tok.encode("hello there world the end"))
    assert text == "hello " and detok.stopped
    assert detok.push(tok.encode("more")) == ""
