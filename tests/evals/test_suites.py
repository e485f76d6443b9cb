"""The suites end to end on the real vLLM engine (CPU build) and real lm-eval, offline:
directories scored through one loopback engine, a served model through its URL, a
user's own lm-eval task, and `realign eval` as a user runs it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.errors import ModelNotFoundError, OperationCancelledError
from app.demo.tiny import TinyTriple
from app.evals.endpoint import Endpoint, Served
from app.evals.models import EvalProgress, EvalSpec, EvalTarget, ModelEval, SuiteName
from app.evals.results import save_scores
from app.evals.runner import check_served, evaluate_models
from app.evals.tasks.hooks import split_text

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NEWS = "The mayor of Lakeview is Dora Winter.\nNews from Lakeview. The river is the Blue River.\n"
TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def eager_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine child starts without graph compilation (seconds, not minutes, on CPU)."""
    monkeypatch.setenv("REALIGN_VLLM_ARGS", json.dumps({"enforce_eager": True}))


def token_perplexity(model_dir: Path, text: str) -> float:
    """Reference: every token of each document predicted after BOS, with transformers."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for doc in split_text(text):
        ids = torch.tensor([[tok.bos_token_id, *tok(doc, add_special_tokens=False).input_ids]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        total += torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(-total / count)


def test_directories_share_one_engine_and_get_every_suite(
    llama_triple_fp32: TinyTriple, tmp_path: Path
) -> None:
    triple = llama_triple_fp32
    news = tmp_path / "news.txt"
    news.write_text(NEWS)
    spec = EvalSpec(
        suites=(SuiteName.chat_format, SuiteName.ifeval_lite, SuiteName.perplexity),
        texts={"news": str(news)},
        limit=3,
        max_tokens=8,
        concurrency=4,
    )
    targets = [
        EvalTarget(model=str(triple.instruct)),
        EvalTarget(model=str(triple.base), chat_template_from=str(triple.instruct)),
    ]
    events: list[EvalProgress] = []
    results = evaluate_models(targets, spec, progress=events.append, log_dir=tmp_path / "logs")

    assert [list(r) for r in results] == [["format", "ifeval-lite", "perplexity"]] * 2
    for scores in results:
        fmt, ifeval, ppl = (scores[s] for s in ("format", "ifeval-lite", "perplexity"))
        assert set(fmt.metrics) == {"format", "stop_rate", "open_rate"}
        assert {"prompt_strict", "instruction_strict"} <= set(ifeval.metrics)
        for score in (fmt, ifeval):
            assert score.n == 3 and score.requests_per_s and score.requests_per_s > 0
            assert all(0 <= v <= 1 for v in score.metrics.values())
        assert set(ppl.metrics) == {"ppl_general", "ppl_news"}
        assert ppl.higher_is_better == {"ppl_general": False, "ppl_news": False}
    # lm-eval's rolling log-likelihoods give the token perplexity transformers gives.
    for scores, target in zip(results, (triple.instruct, triple.base), strict=True):
        expected = token_perplexity(target, NEWS)
        assert scores["perplexity"].metrics["ppl_news"] == pytest.approx(expected, rel=1e-3)

    messages = [(Path(e.model).name, e.message) for e in events if e.suite == "engine"]
    assert messages[0] == ("instruct", "starting an engine")
    assert ("base", "loading the model") in messages  # swapped in, no second engine
    assert sum(m == "starting an engine" for _, m in messages) == 1
    done = [e for e in events if e.suite == "format" and e.done == e.total == 3]
    assert len(done) == 2
    assert (tmp_path / "logs" / "engine.log").is_file()
    assert not (tmp_path / "logs" / "request.json").exists()  # it may hold an API key

    written = save_scores(tmp_path / "m", results[0], targets[0], spec)
    assert sorted(p.name for p in written) == ["format.json", "ifeval-lite.json", "perplexity.json"]
    saved = json.loads((tmp_path / "m" / "eval" / "format.json").read_text())
    assert saved["metrics"] == results[0]["format"].metrics
    assert saved["model"] == str(triple.instruct) and saved["spec"]["limit"] == 3
    assert not list((tmp_path / "m" / "eval").glob(".*"))  # no temporary file left


@pytest.fixture
def served(
    llama_triple_fp32: TinyTriple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Endpoint, Path]]:
    """The endpoint on the other engine, transformers (where vLLM is not installed)."""
    monkeypatch.setenv("REALIGN_ENGINE", "torch")
    model = shutil.copytree(llama_triple_fp32.instruct, tmp_path / "model")
    with Endpoint({"served": Served(model)}, tmp_path / "engine.log") as endpoint:
        yield endpoint, model


def _user_task(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [
        {"question": "Is water wet?", "choices": [" yes", " no"], "answer": 0},
        {"question": "Is fire cold?", "choices": [" yes", " no"], "answer": 1},
    ]
    data = tasks / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return tasks


def test_realign_eval_scores_a_served_model_and_a_user_task(
    served: tuple[Endpoint, Path], tmp_path: Path
) -> None:
    endpoint, model = served
    card = httpx.get(f"{endpoint.base_url}/v1/models").json()["data"][0]
    assert card["id"] == "served" and card["realign"]["engine"] == "torch"
    with pytest.raises(ModelNotFoundError, match="serves: served"):
        check_served(EvalTarget(model="other", base_url=endpoint.base_url))

    # Cancelled as soon as generation starts: the evaluation process is stopped.
    cancel = threading.Event()

    def stop(p: EvalProgress) -> None:
        if p.suite == "format":
            cancel.set()

    target = EvalTarget(model="served", base_url=endpoint.base_url)
    with pytest.raises(OperationCancelledError):
        evaluate_models([target], EvalSpec(), progress=stop, cancel=cancel)
    assert not _live_workers()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "app.cli", "eval", "served", "--url", endpoint.base_url,
               "--model-dir", str(model), "--suite", "format", "--task", "tiny_mc",
               "--tasks-dir", str(_user_task(tmp_path)), "--limit", "2", "--max-tokens", "4",
               "--concurrency", "2", "--json"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    result = ModelEval.model_validate_json(done.stdout)
    assert result.model == "served" and list(result.suites) == ["format", "custom"]
    assert result.suites["format"].n == 2
    custom = result.suites["custom"]
    assert set(custom.metrics) == {"tiny_mc/acc"} and 0 <= custom.metrics["tiny_mc/acc"] <= 1
    assert custom.higher_is_better == {"tiny_mc/acc": True} and custom.n == 2
    assert "format: 2/2" in done.stderr and f"results in {model}/eval/" in done.stderr
    saved = {p.name for p in (model / "eval").iterdir()}
    assert saved == {"format.json", "custom.json"}

    command = [sys.executable, "-m", "app.cli", "eval", "served", "--url", endpoint.base_url,
               "--suite", "perplexity"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--model-dir" in done.stderr, done.stderr


def _live_workers() -> list[psutil.Process]:
    """This process's live evaluation children (other tests' zombies and exited ones
    skipped: they hold no resources)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "app.evals.worker" in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return out
