"""The docs run as written: every ```bash block of README.md and docs/*.md, in order, in
one shell per document (as a reader types them into one terminal), against a
`realign serve` started with the default settings, next to the demo's model layout
(models_cache/demo/models/{base,instruct,new_base}, as `make demo` leaves it).

The server and the blocks run in a private network namespace, so `localhost:8000`
(the default port) is this test's even on a machine where something else listens
there. `curl` fails on an HTTP error status (as `--fail-with-body`), so a 4xx in a
documented call fails the test instead of printing an error body. Blocks that cannot
run here (Hub downloads, GPU workers, Redis) are ```text in the docs, with a sentence
saying why; this test also refuses other shell fences (sh, shell, console) that would
escape it. The README's settings table is generated from ``Settings``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.envparse import markdown_table
from app.core.settings import Settings
from app.demo.tiny import TinyTriple

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL = {"bash"}
ESCAPING = {"sh", "shell", "console", "zsh", "shell-session"}


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each ```bash block of a Markdown file."""
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) in SHELL
    ]


def test_settings_table_is_generated_from_settings() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings-table"), "--check", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert markdown_table(Settings) in (ROOT / "README.md").read_text()


def test_every_shell_block_is_one_the_runner_sees() -> None:
    for doc in DOCS:
        fences = {m.group(1) for m in FENCE.finditer(doc.read_text())}
        assert not fences & ESCAPING, f"{doc.name}: use ```bash (run by this test) or ```text"
    assert shell_blocks(ROOT / "README.md"), "the README has runnable examples"


def _script(doc: Path) -> str:
    """The driver: start the server with default settings, then the doc's blocks."""
    parts = [
        "set -eo pipefail",
        "ip link set lo up 2>/dev/null || true",
        "realign serve > serve.log 2>&1 &",
        "SERVER=$!",
        "trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT",
        "for _ in $(seq 600); do",
        "  command curl -sf localhost:8000/healthz > /dev/null && break",
        "  kill -0 $SERVER || { cat serve.log; exit 1; }",
        "  sleep 0.2",
        "done",
        'curl() { command curl --fail-with-body "$@"; }',
    ]
    for line, block in shell_blocks(doc):
        parts.append(f"echo '>>> {doc.name}:{line}' >&2")
        parts.append(block)
    parts.append(f"echo '>>> {doc.name}: all blocks ran' >&2")
    return "\n".join(parts) + "\n"


def _workspace(tmp: Path, triple: TinyTriple) -> Path:
    """A directory laid out as after `make demo`: the demo's models in the store root."""
    models = tmp / "models_cache" / "demo" / "models"
    for name in ("base", "instruct", "new_base"):
        shutil.copytree(getattr(triple, name), models / name)
    return tmp


def _default_env() -> dict[str, str]:
    """This environment without any REALIGN_* variable: the server runs on defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _isolated() -> list[str]:
    """A command prefix that runs in a private network namespace, if this host allows."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode == 0:
        return ["unshare", "-n"]
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("no network namespace (not root) and port 8000 is taken")
    return []


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if shell_blocks(d)], ids=lambda p: p.name)
def test_shell_blocks_run_as_written(doc: Path, tmp_path: Path, llama_triple: TinyTriple) -> None:
    work = _workspace(tmp_path, llama_triple)
    (work / "docs.sh").write_text(_script(doc))
    res = subprocess.run(
        [*_isolated(), "bash", "docs.sh"],
        cwd=work,
        env=_default_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    ran = [line for line in res.stderr.splitlines() if line.startswith(">>> ")]
    where = ran[-1] if ran else "before the first block"
    log = (work / "serve.log").read_text() if (work / "serve.log").exists() else ""
    assert res.returncode == 0, (
        f"failed in the block at {where}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n"
        f"{res.stderr[-4000:]}\n--- server log\n{log[-4000:]}"
    )
    assert ran[-1].endswith("all blocks ran")
