"""The suites' offline parts: lm-eval's IFEval checkers imported without a download, the
shipped prompt sets, the format rules, the text split, and requests refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.errors import InvalidParameterError, ModelNotFoundError
from app.demo.tiny import TinyTriple
from app.evals.client import Reply, chat_url
from app.evals.endpoint import served_ids
from app.evals.models import EvalSpec, EvalTarget, SuiteName
from app.evals.offline import NEEDS_NLTK_DATA, OFFLINE_ENV, ifeval_checkers, offline_env
from app.evals.runner import check_request, has_chat_template
from app.evals.suites import DATA
from app.evals.tasks.hooks import format_results, opens_as_reply, split_text

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "Hello world. This is a test! Another sentence here, with a comma."


def _prompts() -> list[dict[str, object]]:
    lines = (DATA / "ifeval_lite.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_checkers_import_without_waiting_on_a_download() -> None:
    code = (
        "import os; from app.evals.offline import ifeval_checkers; "
        "r = ifeval_checkers(); print(len(r.INSTRUCTION_DICT), os.environ.get('LOCAL_RANK'))"
    )
    env = {**offline_env(), "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["25", "None"]  # every checker; the variable put back
    assert "nltk_data" not in done.stderr and "punkt" not in done.stdout + done.stderr
    assert time.monotonic() - started < 60


def test_offline_env_switches_the_hub_libraries_off() -> None:
    env = offline_env({"PATH": "/bin", "HF_HUB_OFFLINE": "0"})
    assert env["PATH"] == "/bin"
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"


def test_the_excluded_checkers_are_exactly_those_that_need_nltk_data() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("punkt_tab is installed here: every checker works")
    except LookupError:
        pass
    failing = set()
    for name, checker in ifeval_checkers().INSTRUCTION_DICT.items():
        instance = checker(name)
        kwargs = {"prompt_to_repeat": "Say hi."} if name == "combination:repeat_prompt" else {}
        instance.build_description(**kwargs)
        try:
            instance.check_following(SAMPLE)
        except LookupError:
            failing.add(name)
    assert failing == NEEDS_NLTK_DATA


def test_ifeval_lite_prompts_are_worded_by_the_checkers_they_are_scored_with() -> None:
    registry = ifeval_checkers().INSTRUCTION_DICT
    prompts = _prompts()
    assert 30 <= len(prompts) <= 60
    assert len({p["key"] for p in prompts}) == len(prompts)
    kinds = set()
    for p in prompts:
        ids, kwargs = p["instruction_id_list"], p["kwargs"]
        assert isinstance(ids, list) and isinstance(kwargs, list) and len(ids) == len(kwargs)
        for iid, kw in zip(ids, kwargs, strict=True):
            assert iid in registry and iid not in NEEDS_NLTK_DATA
            description = registry[iid](iid).build_description(**kw)
            assert description in str(p["prompt"]), (iid, p["prompt"])
            kinds.add(iid.split(":")[1])
    # length limits, keyword inclusion/exclusion, JSON and list format, case
    assert {"number_words", "existence", "forbidden_words", "json_format",
            "number_bullet_lists", "english_lowercase", "english_capital"} <= kinds  # fmt: skip


def test_format_prompts_are_plain_questions() -> None:
    lines = (DATA / "format_prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    assert 30 <= len(prompts) <= 60 and all(p.strip() for p in prompts)


@pytest.mark.parametrize(
    ("text", "opens"),
    [
        ("Sure! The mayor of Lakeview is Dora Winter.", True),
        ("  Paris is the capital of France.", True),
        ("assistant\n\nSure!", False),  # a role header, special tokens stripped
        ("user: what is", False),
        ("<|start_header_id|>assistant", False),
        ("[INST] hi", False),
        ("### Response: ok", False),
        ("", False),
        ("   \n", False),
    ],
)
def test_a_reply_opens_as_the_assistant_turn(text: str, opens: bool) -> None:
    assert opens_as_reply(text) is opens


def test_format_counts_replies_that_end_their_turn() -> None:
    def score(reply: Reply) -> dict[str, float]:
        return format_results({}, [reply])

    text = "Sure! It is blue."
    assert score(Reply(text, "stop", None, True)) == {"format": 1, "stop_rate": 1, "open_rate": 1}
    # Ended on another stop token (a base model's end of text): not the end of a turn.
    assert score(Reply(text, "stop", 508, True))["stop_rate"] == 0
    assert score(Reply(text, "stop", "\n\n", True))["stop_rate"] == 0
    assert score(Reply(text, "length", None, True))["format"] == 0
    # A server that does not say which stop token: finish_reason alone.
    assert score(Reply(text, "stop"))["stop_rate"] == 1
    assert score(Reply("assistant\n\nSure!", "stop", None, True)) == {
        "format": 0, "stop_rate": 1, "open_rate": 0,
    }  # fmt: skip
    # A reply without a finish reason (not from the chat client) never counts as stopped.
    assert format_results({}, [text]) == {"format": 0, "stop_rate": 0, "open_rate": 1}


def test_text_files_split_into_paragraphs_or_lines() -> None:
    assert split_text("One\ntwo.\n\n\nThree\n  four.\n") == ["One two.", "Three four."]
    assert split_text("a b\n\nc") == ["a b", "c"]
    assert split_text("first line\nsecond line\n") == ["first line", "second line"]
    assert split_text("\n  \n") == []


def test_chat_urls_from_a_server_root_a_v1_base_or_the_full_url() -> None:
    full = "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1") == chat_url("http://h:1/v1/") == chat_url(full) == full


def test_requests_that_cannot_run_are_refused_before_anything_starts(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    base, instruct = str(llama_triple.base), str(llama_triple.instruct)
    assert has_chat_template(llama_triple.instruct)
    assert not has_chat_template(llama_triple.base)
    chat = EvalSpec(suites=(SuiteName.chat_format,))
    with pytest.raises(InvalidParameterError, match=r"no chat template.*--chat-template-from"):
        check_request(EvalTarget(model=base), chat)
    check_request(EvalTarget(model=base, chat_template_from=instruct), chat)
    check_request(EvalTarget(model=base), EvalSpec(suites=(SuiteName.perplexity,)))

    served = EvalTarget(model="m", base_url="http://127.0.0.1:9")
    with pytest.raises(InvalidParameterError, match="--model-dir"):
        check_request(served, EvalSpec(suites=(SuiteName.perplexity,)))
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        check_request(EvalTarget(model=str(tmp_path)), chat)
    with pytest.raises(ModelNotFoundError, match="text 'news'"):
        check_request(served, EvalSpec(texts={"news": str(tmp_path / "missing.txt")}))
    with pytest.raises(InvalidParameterError, match="task directory and task names"):
        check_request(served, EvalSpec(suites=(SuiteName.custom,)))


def test_directories_get_distinct_model_ids() -> None:
    dirs = [Path("/a/x"), Path("/b/x-3"), Path("/c/x"), Path("/d/x"), Path("/e/x"), Path("/f/y z")]
    assert served_ids(dirs) == ["x", "x-3", "x-2", "x-4", "x-5", "y-z"]
