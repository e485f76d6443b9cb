"""Streaming detokenizer cost per token: the windowed Detokenizer against re-decoding
the whole answer on every chunk (the yardstick, same process, same ids).

    .venv/bin/python bench/detok.py
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

from app.demo.tiny import write_tokenizer
from app.serving.tokens import Detokenizer, ServedTokenizer


def per_token_us(fn: object, ids: list[int], repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(ids)  # type: ignore[operator]
        runs.append((time.perf_counter() - t) / len(ids) * 1e6)
    return statistics.median(runs)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    write_tokenizer(root, chat=True)
    tok = ServedTokenizer.load(root)
    rng = random.Random(0)

    def windowed(ids: list[int]) -> None:
        d = Detokenizer(tok, [])
        for i in ids:
            d.push([i])

    def full_redecode(ids: list[int]) -> None:
        for n in range(1, len(ids) + 1):
            tok.decode(ids[:n])

    print("| answer tokens | windowed us/token | full re-decode us/token | ratio |")
    print("|---|---|---|---|")
    for n in (64, 512, 2048):
        ids = [rng.randrange(0, 500) for _ in range(n)]
        new, old = per_token_us(windowed, ids), per_token_us(full_redecode, ids)
        print(f"| {n} | {new:.1f} | {old:.1f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
