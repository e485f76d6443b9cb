"""The ``realign`` command line, run as users run it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from app.demo.tiny import TinyTriple
from tests.helpers import stored

ROOT = Path(__file__).resolve().parents[1]


def realign(*args: str, env_store: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    if env_store is not None:
        env["REALIGN_MODELS_CACHE_DIR"] = str(env_store)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_the_verbs() -> None:
    res = realign("--help")
    assert res.returncode == 0
    for verb in ("merge", "compute", "apply", "convert", "inspect", "verify", "ls", "rm", "demo"):
        assert verb in res.stdout
    merge_help = realign("merge", "--help").stdout
    for flag in (
        "--base",
        "--instruct",
        "--target",
        "--out",
        "--alpha",
        "--dtype",
        "--store",
        "--device",
        "--no-cache",
    ):
        assert flag in merge_help


def test_compute_apply_inspect_verify_ls_rm(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    res = realign(
        "compute", "--base", str(t.base), "--instruct", str(t.instruct), env_store=store_dir
    )  # store from REALIGN_MODELS_CACHE_DIR
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip().splitlines()[-1]
    assert (store_dir / "residuals" / key / "manifest.json").is_file()
    out = tmp_path / "merged"
    res = realign(
        "apply",
        "--residual",
        key[:8],
        "--target",
        str(t.new_base),
        "--out",
        str(out),
        "--alpha",
        "0.5",
        "--store",
        str(store_dir),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file()
    shown = realign("inspect", str(out)).stdout
    assert "alpha 0.5" in shown and key in shown
    shown = realign("inspect", key, "--store", str(store_dir)).stdout
    assert "exact (lossless)" in shown and "x the bf16 pack" in shown
    assert realign("verify", key, "--store", str(store_dir)).returncode == 0
    assert key in realign("ls", "--store", str(store_dir)).stdout
    assert realign("rm", key, "--store", str(store_dir)).returncode == 0
    assert stored(store_dir) == []


def test_merge_no_cache(llama_triple: TinyTriple, store_dir: Path, tmp_path: Path) -> None:
    t = llama_triple
    out = tmp_path / "fused"
    res = realign(
        "merge",
        "--base",
        str(t.base),
        "--instruct",
        str(t.instruct),
        "--target",
        str(t.new_base),
        "--out",
        str(out),
        "--store",
        str(store_dir),
        "--no-cache",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert stored(store_dir) == []


def test_user_mistakes_are_one_line_errors(
    llama_triple: TinyTriple, qwen_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    out = tmp_path / "out"
    cases = [
        (["--instruct", str(qwen_triple.instruct)], "not the same architecture"),
        (["--instruct", str(tmp_path / "missing")], "no such directory"),
        (["--instruct", str(tmp_path / "[bold]x")], f"{tmp_path}/[bold]x"),  # no markup
        (["--instruct", "gs://bucket/model"], "not supported"),
        (["--instruct", str(t.instruct), "--dtype", "int2"], "pack format"),
        (["--instruct", str(t.instruct), "--device", "cuda"], "no CUDA device"),
    ]
    for extra, message in cases:
        res = realign(
            "merge",
            "--base",
            str(t.base),
            "--target",
            str(t.new_base),
            "--out",
            str(out),
            "--store",
            str(store_dir),
            *extra,
        )
        assert res.returncode == 1, (extra, res.stderr)
        assert message in res.stderr, (extra, res.stderr)
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().startswith("error:")
        assert not out.exists()
    assert stored(store_dir) == []
    res = realign("verify", "deadbeef", "--store", str(store_dir))
    assert res.returncode == 1 and "realign ls" in res.stderr


def test_unusable_alpha_is_refused_before_any_work(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    for alpha in ("inf", "nan", "1e39"):
        res = realign(
            "merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base),
            "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s"), "--alpha", alpha,
        )  # fmt: skip
        assert res.returncode == 1, res.stderr
        assert "alpha must be a finite number" in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "out").exists() and stored(tmp_path / "s") == []


def test_merge_and_apply_by_method(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    from app.merge import ResidualInput, apply, merge
    from tests.helpers import load_dir

    t = llama_triple
    pair = ["-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base)]
    res = realign(
        "merge", *pair, "-o", str(tmp_path / "ties"), "--store", str(store_dir),
        "--method", "ties", "--density", "0.4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    same = merge(
        str(t.base), str(t.instruct), str(t.new_base), tmp_path / "ties-api", method="ties",
        params={"density": 0.4}, store=store_dir,
    )  # fmt: skip
    assert same.residual_key is not None and not same.residual_created
    got, want = load_dir(tmp_path / "ties"), load_dir(same.out)
    assert all(torch.equal(got[n], want[n]) for n in want)

    key = same.residual_key
    res = realign(
        "apply", "-r", key[:10], "-r", key, "-w", "1", "-w", "0.5", "-t", str(t.new_base),
        "-o", str(tmp_path / "dare"), "--store", str(store_dir), "--method", "dare",
        "--drop-rate", "0.3", "--param", "seed=4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    both = [ResidualInput(key=key), ResidualInput(key=key, weight=0.5)]
    same = apply(
        both, str(t.new_base), tmp_path / "dare-api", method="dare",
        params={"drop_rate": 0.3, "seed": 4}, store=store_dir,
    )  # fmt: skip
    got, want = load_dir(tmp_path / "dare"), load_dir(same.out)
    assert all(torch.equal(got[n], want[n]) for n in want)
    shown = realign("inspect", str(tmp_path / "dare")).stdout
    assert "method=dare" in shown and "drop_rate=0.3" in shown and "seed=4" in shown
    assert "weight 0.5" in shown


def test_bad_method_options_exit_2_before_any_work(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    out = tmp_path / "out"
    pair = ["-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base)]
    cases = [
        (["merge", *pair, "--method", "slerp"], "unknown merge method 'slerp'"),
        (["merge", *pair, "--method", "ties", "--drop-rate", "0.5"], "no parameter 'drop_rate'"),
        (["merge", *pair, "--method", "ties", "--density", "1.5"], "density=1.5 is out of range"),
        (["merge", *pair, "--method", "dare", "--param", "seed"], "give NAME=VALUE"),
        (["merge", *pair, "--method", "dare", "--param", "seed=x"], "must be a number"),
        (["merge", *pair, "--density", "0.5"], "task_arithmetic has no parameter 'density'"),
        (["merge", *pair, "--method", "ties", "--no-cache"], "drop --no-cache"),
        (
            ["apply", "-r", "abcdef", "-r", "abcdef", "-w", "1", "-t", str(t.new_base)],
            "1 --weight for 2 --residual",
        ),
    ]
    for args, message in cases:
        res = realign(*args, "-o", str(out), "--store", str(store_dir))
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
        assert not out.exists()
    assert stored(store_dir) == []
