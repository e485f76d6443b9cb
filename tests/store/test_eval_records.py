"""Evaluation scores as store artifacts (kind ``evals``): published atomically beside the
merged model, immutable, checked on read (a damaged record is set aside and scored
again), kept whatever the budget, listed by ``realign inspect`` of the model; on a local
store and on a bucket alike."""

from __future__ import annotations

from pathlib import Path

from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.evals.models import SuiteScore
from app.evals.stored import StoredScore, publish_score, read_score, score_key, scores_of
from app.merge import inspect, list_artifacts, merge_to_store
from app.residuals.manifest import MergeManifest
from app.store.base import EVAL_FILE
from app.store.local import LocalStore
from tests.s3server import S3Server, object_settings, object_store
from tests.test_cli import realign

INPUTS = {"limit": 4, "max_tokens": 16, "chat": "c" * 64}


def _score(content_key: str, value: float, suite: str = "format") -> StoredScore:
    return StoredScore(
        key=score_key(content_key, suite, INPUTS),
        content_key=content_key,
        suite=suite,
        inputs=INPUTS,
        score=SuiteScore(
            suite=suite, metrics={"format": value}, higher_is_better={"format": True}, n=4,
            seconds=1.5,
        ),
    )  # fmt: skip


def _merged(t: TinyTriple, settings: Settings) -> str:
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    return merge_to_store(**req, alpha=0.35, settings=settings).key


def test_scores_sit_beside_the_model_in_a_local_store(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    settings = Settings(models_cache_dir=store_dir)
    key = _merged(llama_triple, settings)
    st = LocalStore(store_dir)
    first = _score(key, 0.75)
    assert first.key.startswith(key) and first.key != key  # listed by the model's key
    assert publish_score(st, first)
    record = store_dir / "evals" / first.key / EVAL_FILE
    written = record.read_bytes()
    # Immutable: the same key published again (another run) leaves the first record.
    assert not publish_score(st, _score(key, 0.25))
    assert record.read_bytes() == written
    other = _score(key, 0.5, suite="ifeval-lite")
    assert publish_score(st, other)

    fresh = LocalStore(store_dir)  # another process: nothing but the store holds them
    assert read_score(fresh, first.key) == first
    assert scores_of(fresh, key) == sorted([first, other], key=lambda s: (s.created, s.suite))
    assert scores_of(fresh, "0" * 32) == []
    # Weights only are listed and budgeted: a budget of one byte evicts the model's
    # files, never its few-hundred-byte scores.
    assert {a.kind for a in list_artifacts(store_dir, settings)} == {"residuals", "merged"}
    assert LocalStore(store_dir, budget_bytes=1).evict()
    assert not (store_dir / "merged" / key).exists()
    assert {s.key for s in scores_of(fresh, key)} == {first.key, other.key}


def test_realign_inspect_lists_a_merged_models_scores(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    settings = Settings(models_cache_dir=store_dir)
    key = _merged(llama_triple, settings)
    st = LocalStore(store_dir)
    publish_score(st, _score(key, 0.75))
    for ref in (key[:10], str(store_dir / "merged" / key)):
        done = realign("inspect", ref, "--store", str(store_dir))
        assert done.returncode == 0, done.stderr
        assert "alpha 0.35" in done.stdout
        line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("eval "))
        assert "format" in line and "format=0.75" in line and "n=4 limit=4" in line
    # --json keeps printing the manifest alone
    done = realign("inspect", key, "--store", str(store_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert MergeManifest.model_validate_json(done.stdout).alpha == 0.35


def test_a_damaged_record_is_set_aside_and_scored_again(
    llama_triple: TinyTriple, store_dir: Path
) -> None:
    st = LocalStore(store_dir)
    key = "ab" * 16
    stored = _score(key, 0.75)
    publish_score(st, stored)
    record = store_dir / "evals" / stored.key / EVAL_FILE
    record.write_bytes(record.read_bytes().replace(b"0.75", b"0.95"))
    # A view skips it and leaves it in place; an evaluation's read sets it aside.
    assert scores_of(st, key) == []
    assert record.exists()
    told: list[str] = []
    assert read_score(st, stored.key, notice=told.append) is None
    assert not record.exists() and st.quarantine_count() == 1
    assert len(told) == 1 and "damaged" in told[0] and "scoring again" in told[0]
    assert publish_score(st, stored)  # the next evaluation publishes it afresh
    assert read_score(st, stored.key) == stored


def test_scores_in_a_bucket(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    key = _merged(llama_triple, object_settings(s3_server, bucket, tmp_path / "a"))
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    stored = _score(key, 0.75)
    assert publish_score(node_a, stored)
    names = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"realign/evals/{stored.key}/.realign-commit.json" in names

    # Another node with an empty cache reads it from the bucket, downloading nothing
    # else: the merged model's manifest for inspect, the score for its listing.
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    assert scores_of(node_b, key) == [stored]
    manifest = inspect(key, store=node_b)
    assert isinstance(manifest, MergeManifest) and manifest.alpha == 0.35
    assert not (tmp_path / "b" / "merged" / key).exists()
    assert not publish_score(node_b, _score(key, 0.25))  # the first stays
    assert [s.score.metrics for s in scores_of(node_b, key)] == [{"format": 0.75}]

    # Rewritten in the bucket: its commit marker's sha256 no longer matches, so the
    # record is set aside (the marker moves to quarantine) and published afresh.
    data = next(n for n in names if n.startswith(f"realign/evals/{stored.key}/.build-"))
    s3_server.client().put_object(Bucket=bucket, Key=data, Body=b'{"forged": 1}')
    node_c = object_store(s3_server, bucket, tmp_path / "c")
    assert scores_of(node_c, key) == []
    assert read_score(node_c, stored.key) is None and not node_c.exists(stored.key, "evals")
    assert publish_score(node_c, stored)
    assert read_score(object_store(s3_server, bucket, tmp_path / "d"), stored.key) == stored
