"""``realign merge / apply / compute`` and the lineage check, run as users run them."""

from __future__ import annotations

import json
from pathlib import Path

from app.demo.tiny import TinyTriple
from tests.helpers import stored
from tests.test_cli import realign


def test_unrelated_target_exits_1_until_forced(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    t, out = llama_triple, tmp_path / "merged"
    args = ["merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(llama_unrelated),
            "-o", str(out), "--store", str(store_dir)]  # fmt: skip
    res = realign(*args)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: target does not descend"), lines
    assert "limit 0.8" in lines[0] and "--force" in lines[0] and "one lineage" in lines[0]
    assert stored(store_dir) == [] and not out.exists()

    res = realign(*args, "--force")
    assert res.returncode == 0, res.stderr
    assert "warning: lineage: " in res.stderr and "past the limit" in res.stderr
    lineage = json.loads((out / "realign.json").read_text())["lineage"]
    assert lineage["forced"] is True and lineage["passed"] is False
    assert lineage["distances"]["target-base"]["median"] > 1.3
    assert "lineage instruct-base" in realign("inspect", str(out)).stdout


def test_apply_and_compute_take_force(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    res = realign("compute", "-b", str(t.base), "-i", str(t.instruct), "--store", str(store_dir))
    assert res.returncode == 0, res.stderr
    assert "lineage: instruct-base 0.5" in res.stderr
    key = res.stdout.strip().splitlines()[-1]
    apply = ["apply", "-r", key, "-t", str(llama_unrelated), "--store", str(store_dir)]
    res = realign(*apply, "-o", str(tmp_path / "a"))
    assert res.returncode == 1 and "error: target does not descend" in res.stderr
    assert not (tmp_path / "a").exists()
    assert realign(*apply, "-o", str(tmp_path / "b"), "--force").returncode == 0
    # An instruct model unrelated to the base: compute refuses it the same way.
    res = realign("compute", "-b", str(t.base), "-i", str(llama_unrelated),
                  "--store", str(store_dir))  # fmt: skip
    assert res.returncode == 1 and "error: instruct does not descend" in res.stderr
