"""Models that ship code (auto_map, *.py) are refused as inputs, by the CLI and by the
API's validation, unless an administrator allowed that code by hash; outputs never
carry auto_map nor *.py files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import RemoteCodeError
from app.demo.tiny import TinyTriple
from app.merge import compute, preflight
from tests.helpers import copy_model, stored

ROOT = Path(__file__).resolve().parents[2]
AUTO_MAP = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
HASH = re.compile(r"hash ([0-9a-f]{64})")


def realign(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def add_auto_map(model: Path, name: str = "config.json") -> None:
    cfg = json.loads((model / name).read_text())
    cfg["auto_map"] = AUTO_MAP
    (model / name).write_text(json.dumps(cfg))


def add_code(model: Path, rel: str = "modeling_evil.py") -> None:
    (model / rel).parent.mkdir(parents=True, exist_ok=True)
    (model / rel).write_text("import os\nos.system('touch /tmp/pwned')\n")


def with_code(t: TinyTriple, role: str, tmp: Path, how: str) -> dict[str, str]:
    """The triple's refs with ``role`` replaced by a copy that ships code."""
    refs = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    bad = copy_model(Path(refs[role]), tmp / f"{role}-code")
    if how == "auto_map":
        add_auto_map(bad)
    elif how == "tokenizer_auto_map":
        add_auto_map(bad, "tokenizer_config.json")
    else:
        add_code(bad, "sub/modeling_evil.py")
    refs[role] = str(bad)
    return refs


def assert_refusal(message: str, model: str) -> str:
    """The message says which model, why, and what to do; returns the printed hash."""
    assert model in message and "ships its own code" in message
    assert "arbitrary Python" in message and "never runs model code" in message
    assert "REALIGN_TRUSTED_CODE_SHA256" in message
    found = HASH.search(message)
    assert found is not None, message
    return found.group(1)


@pytest.mark.parametrize(
    ("role", "how"),
    [("base", "py"), ("instruct", "auto_map"), ("target", "auto_map")],
)
def test_cli_merge_refuses_code_in_any_input(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path, role: str, how: str
) -> None:
    refs = with_code(llama_triple, role, tmp_path, how)
    out = tmp_path / "out"
    res = realign(
        "merge", "-b", refs["base"], "-i", refs["instruct"], "-t", refs["target"],
        "-o", str(out), "--store", str(store_dir), "-q",
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line, no traceback
    assert_refusal(res.stderr.replace("\n", " "), refs[role])
    assert not out.exists() and stored(store_dir) == []


def test_cli_compute_and_apply_refuse_code(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    refs = with_code(llama_triple, "instruct", tmp_path, "py")
    res = realign("compute", "-b", refs["base"], "-i", refs["instruct"], "--store", str(store_dir))
    assert res.returncode == 1 and "ships its own code" in res.stderr, res.stderr
    assert stored(store_dir) == []

    key = compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir).key
    target = copy_model(llama_triple.new_base, tmp_path / "target-code")
    add_auto_map(target)
    out = tmp_path / "out"
    res = realign("apply", "-r", key, "-t", str(target), "-o", str(out), "--store", str(store_dir))
    assert res.returncode == 1, res.stderr
    assert_refusal(res.stderr.replace("\n", " "), str(target))
    assert not out.exists()


@pytest.mark.parametrize(
    ("role", "how"),
    [("base", "tokenizer_auto_map"), ("instruct", "py"), ("target", "auto_map")],
)
def test_api_preflight_refuses_code(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path, role: str, how: str
) -> None:
    refs = with_code(llama_triple, role, tmp_path, how)
    with pytest.raises(RemoteCodeError) as exc:
        preflight(target=refs["target"], base=refs["base"], instruct=refs["instruct"],
                  store=store_dir)  # fmt: skip
    assert exc.value.code == "remote_code_refused"
    assert_refusal(str(exc.value), refs[role])


def test_api_preflight_refuses_code_in_target_of_a_stored_residual(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    key = compute(str(llama_triple.base), str(llama_triple.instruct), store=store_dir).key
    target = copy_model(llama_triple.new_base, tmp_path / "target-code")
    add_code(target)
    with pytest.raises(RemoteCodeError):
        preflight(target=str(target), residual=key, store=store_dir)


def test_allowlisted_code_is_accepted_and_never_reaches_outputs(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    instruct = copy_model(t.instruct, tmp_path / "instruct-code")
    add_auto_map(instruct)
    add_auto_map(instruct, "tokenizer_config.json")
    add_code(instruct)
    target = copy_model(t.new_base, tmp_path / "target-code")
    add_auto_map(target)
    args = ["-b", str(t.base), "-i", str(instruct), "-t", str(target), "--store", str(store_dir)]
    out = tmp_path / "out"

    refused = realign("merge", *args, "-o", str(out), "-q")
    first = assert_refusal(refused.stderr.replace("\n", " "), str(instruct))
    allow_first = json.dumps([first])
    refused = realign("merge", *args, "-o", str(out), "-q", REALIGN_TRUSTED_CODE_SHA256=allow_first)
    second = assert_refusal(refused.stderr.replace("\n", " "), str(target))
    assert second != first and not out.exists()

    allow = json.dumps([first.upper(), second])  # case does not matter
    res = realign("merge", *args, "-o", str(out), "-q", REALIGN_TRUSTED_CODE_SHA256=allow)
    assert res.returncode == 0, res.stderr
    for produced in (out, *sorted((store_dir / "residuals").iterdir())):
        assert list(produced.rglob("*.py")) == []
        for f in produced.rglob("*.json"):
            assert "auto_map" not in json.loads(f.read_text()), f

    (instruct / "modeling_evil.py").write_text("print('changed')\n")  # same name, new code
    res = realign("merge", *args, "-o", str(tmp_path / "out2"), "-q",
                  REALIGN_TRUSTED_CODE_SHA256=allow)  # fmt: skip
    assert res.returncode == 1
    assert assert_refusal(res.stderr.replace("\n", " "), str(instruct)) not in (first, second)
