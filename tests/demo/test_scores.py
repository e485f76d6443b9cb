"""The demo's story in numbers, on the trained demo models: the merge follows the chat
format like the instruct model and knows the news the new base read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.demo.scores import FORMAT_RATIO, PPL_RATIO, DemoScores, news_text, score_demo
from app.demo.tiny import TinyTriple
from app.demo.train import cached_triple, make_trained_triple, news_facts
from app.evals.models import SuiteName
from app.merge import merge

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# Where `realign demo` (run from the checkout) and the bench scripts keep the trained models.
CACHES = (ROOT / "bench" / "data" / "demo", ROOT / "models_cache" / "demo" / "models")


@pytest.fixture(scope="module")
def trained() -> TinyTriple:
    """The demo's trained triple, from a cache; else trained once into the bench's cache
    (several minutes on two cores; later runs reuse it)."""
    for root in CACHES:
        triple = cached_triple(root)
        if triple is not None:
            return triple
    shutil.rmtree(CACHES[0], ignore_errors=True)  # an interrupted training's leftovers
    return make_trained_triple(CACHES[0])


@pytest.fixture(scope="module")
def scores(trained: TinyTriple, tmp_path_factory: pytest.TempPathFactory) -> DemoScores:
    work = tmp_path_factory.mktemp("demo_scores")
    merged = work / "merged"
    merge(str(trained.base), str(trained.instruct), str(trained.new_base), merged,
          no_cache=True, store=work / "store")  # fmt: skip
    with pytest.MonkeyPatch.context() as env:  # no graph compilation: a quick engine start
        env.setenv("REALIGN_VLLM_ARGS", json.dumps({"enforce_eager": True}))
        return score_demo(
            trained, merged, work, suites=(SuiteName.chat_format, SuiteName.perplexity)
        )


def test_news_text_is_what_the_new_base_read() -> None:
    lines = news_text().splitlines()
    assert len(lines) == 2 * len(news_facts())
    assert lines[:2] == [
        "The mayor of Lakeview is Dora Winter.",
        "News from Lakeview. The mayor of Lakeview is Dora Winter.",
    ]


def test_the_merge_follows_the_chat_format_like_the_instruct_model(scores: DemoScores) -> None:
    def fmt(label: str) -> float:
        return scores.metric(label, SuiteName.chat_format, "format")

    assert fmt("instruct") >= 0.75  # the instruct model ends its turns on <|eot_id|>
    assert fmt("base") <= 0.1 and fmt("new_base") <= 0.1  # bases end documents instead
    assert scores.format_ratio >= FORMAT_RATIO, scores.scores


def test_the_merge_knows_the_news(scores: DemoScores) -> None:
    def ppl(label: str) -> float:
        return scores.metric(label, SuiteName.perplexity, "ppl_news")

    assert ppl("new_base") < ppl("merged") < 0.05 * min(ppl("base"), ppl("instruct"))


def test_the_merge_knows_the_news_within_the_story_margin(scores: DemoScores) -> None:
    assert scores.ppl_ratio <= PPL_RATIO
