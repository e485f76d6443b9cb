"""Evaluation scores kept in the store, beside the models they were measured on.

One ``evals`` artifact per model, suite and suite inputs: a sealed JSON file
(:data:`~app.store.base.EVAL_FILE`) holding the score and the content key of the model
it belongs to. Its key derives from that content key, the suite and a digest of the
inputs (limits, reply budget, chat format, data files), so the same weights scored on
the same inputs always find the same artifact: each model is evaluated once per suite.
Published atomically through the :class:`~app.store.base.Store` protocol (a local store
or a bucket), never changed afterwards, and checked against its seal on every read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import ArtifactCorruptError, ArtifactNotFoundError
from app.evals.models import SuiteScore
from app.residuals.manifest import parse_sealed, write_json
from app.store.base import EVAL_FILE, Store
from app.store.keys import eval_key, eval_prefix

log = logging.getLogger(__name__)


class StoredScore(BaseModel):
    """One model's score on one suite, as the store keeps it."""

    model_config = ConfigDict(frozen=True)

    format: Literal["realign.eval/1"] = "realign.eval/1"
    key: str = Field(description="This record's key in the store (kind ``evals``).")
    content_key: str = Field(
        description="The model's content key: its merged key, the digest of a model "
        "directory, or an in-engine merge's pack, target digest and alpha."
    )
    suite: str
    inputs: dict[str, Any] = Field(
        description="What the score depends on besides the weights: limit, max_tokens, "
        "the chat format's digest, the digests of the text files and task directory."
    )
    score: SuiteScore
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def summary(self) -> dict[str, Any]:
        """The score as a model card shows it (JSON-ready)."""
        return {
            "suite": self.suite,
            "metrics": self.score.metrics,
            "higher_is_better": self.score.higher_is_better,
            "n": self.score.n,
            "limit": self.inputs.get("limit"),
            "max_tokens": self.inputs.get("max_tokens"),
            "created": self.created.isoformat(),
            "key": self.key,
        }


def score_key(content_key: str, suite: str, inputs: Mapping[str, object]) -> str:
    """The store key of the score of ``content_key`` on ``suite`` with ``inputs``."""
    blob = json.dumps(inputs, sort_keys=True).encode()
    return eval_key(content_key, suite, hashlib.sha256(blob).hexdigest())


def read_score(
    store: Store, key: str, *, repair: bool = True, notice: Callable[[str], object] | None = None
) -> StoredScore | None:
    """The score published as ``key``; None when there is none.

    A record that fails its check (a changed byte, a bucket object that does not match
    its commit marker) counts as absent: with ``repair`` it is quarantined (kept aside)
    so that the model is scored again and the record published afresh, and ``notice``
    is told.
    """
    try:
        raw = store.read_text(key, EVAL_FILE, "evals").encode()
        stored = StoredScore.model_validate(parse_sealed(raw, f"eval {key}", EVAL_FILE))
        if stored.key != key:
            raise ArtifactCorruptError(
                f"eval {key}: the record inside is {stored.key}", file=EVAL_FILE
            )
    except ArtifactNotFoundError:
        return None
    except (ArtifactCorruptError, ValidationError, UnicodeError) as exc:
        if not repair:
            log.warning("eval %s: unreadable, skipped (%s)", key, exc)
            return None
        moved = store.quarantine(key, "evals", str(exc))
        where = f"kept at {moved}" if moved else "set aside"
        message = f"stored score {key} is damaged ({exc}); {where}, scoring again"
        log.warning("%s", message)
        if notice is not None:
            notice(message)
        return None
    return stored


def publish_score(store: Store, stored: StoredScore) -> bool:
    """Publish ``stored`` (atomically; a record already there stays); True when this
    call published it."""

    def build(tmp: Path) -> None:
        write_json(tmp / EVAL_FILE, stored)

    return store.get_or_build(stored.key, build, "evals")


def scores_of(store: Store, content_key: str) -> list[StoredScore]:
    """Every stored score of the model with ``content_key``, oldest first (damaged
    records are skipped here, and repaired by the next evaluation that needs them)."""
    keys = store.keys("evals", eval_prefix(content_key))
    found = (read_score(store, k, repair=False) for k in keys)
    return sorted(
        (s for s in found if s is not None and s.content_key == content_key),
        key=lambda s: (s.created, s.suite),
    )
