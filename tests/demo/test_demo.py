"""`realign demo` (what `make demo` runs after installing): the service path end to end,
as a user runs it, with the default settings — `realign serve`, POST /merge with
serve=true, the job followed to `succeeded`, a chat through the OpenAI SDK, the four
models scored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3  # the service path, not the story: a few steps train in seconds


@pytest.mark.slow
def test_demo_goes_through_the_service_on_default_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALIGN_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--steps", str(STEPS), "--eval-limit", "2"],
        cwd=tmp_path,  # the store is models_cache/ here, as in a fresh clone
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = tmp_path / "models_cache" / "demo" / "serve.log"
    assert res.returncode == 0, f"{res.stderr}\n--- server\n{log.read_text()[-4000:]}"
    steps = res.stderr
    for expected in ("realign serve --port", "POST /merge", "succeeded  stage=load",
                     "served as 'demo-news'", "OpenAI SDK: chat.completions.create"):  # fmt: skip
        assert expected in steps, steps
    lines = res.stdout.splitlines()
    assert lines[0].startswith("user: ")
    assert lines[1].startswith("merged (new_base + instruct - base):")
    assert lines[2].startswith("new_base alone, same prompt:")
    # Then the evidence: every model scored, and the story's two ratios as measured.
    assert lines[3].split() == ["model", "format", "ifeval-lite", "news", "ppl"]
    assert [line.split()[0] for line in lines[4:8]] == ["base", "instruct", "new_base", "merged"]
    assert lines[8].startswith("merged vs instruct, format:") and "news perplexity" in lines[8]
    assert "evaluating base, instruct, new_base and the merge" in steps
    assert (tmp_path / "models_cache" / "merged").is_dir()  # published in the default store
