"""Content-addressed keys: the same inputs and parameters always give the same key."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence

from app.core.errors import AmbiguousKeyError, ArtifactNotFoundError

KEY_LENGTH = 32
_KEY = re.compile(r"^[0-9a-f]{6,64}$")
_MERGED = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
_SCHEMA = 1  # bump when the pack format changes incompatibly


def residual_key(instruct_digest: str, base_digest: str, *, method: str, dtype: str) -> str:
    """Key of the residual pack of (instruct, base) with a method and storage dtype."""
    return _key(
        {
            "kind": "residual",
            "instruct": instruct_digest,
            "base": base_digest,
            "method": method,
            "dtype": dtype,
        }
    )


def merged_key(
    residual: str,
    target_digest: str,
    *,
    alpha: float,
    method: str = "task_arithmetic",
    params: Mapping[str, float | int] | None = None,
    residuals: Sequence[tuple[str, float]] | None = None,
) -> str:
    """Key of a merged model made from a residual (the first one) and a target.

    A merge by another method than task arithmetic, with parameters, or of several (or
    weighted) ``residuals`` (``(key, weight)`` in order) keys those too; the task-
    arithmetic merge of one residual keeps the key it always had.
    """
    fields = {
        "kind": "merged",
        "residual": residual,
        "target": target_digest,
        "alpha": repr(float(alpha)),
    }
    if method != "task_arithmetic" or params:
        fields["method"] = method
        fields["params"] = json.dumps(
            {k: repr(v) if isinstance(v, float) else v for k, v in (params or {}).items()},
            sort_keys=True,
        )
    if residuals and [(k, float(w)) for k, w in residuals] != [(residual, 1.0)]:
        fields["residuals"] = json.dumps([[k, repr(float(w))] for k, w in residuals])
    return _key(fields)


def eval_key(content_key: str, suite: str, inputs: str) -> str:
    """Key of one model's score on one suite with given inputs (``inputs``: a digest of
    the limits, budget, chat format and data files); the model's part comes first
    (:func:`eval_prefix`), so that a model's scores are listed by that prefix."""
    fields = {"kind": "eval", "model": content_key, "suite": suite, "inputs": inputs}
    return eval_prefix(content_key) + _key(fields)


def eval_prefix(content_key: str) -> str:
    """The key prefix of every score of the model with ``content_key``: its merged key
    itself (so its scores sit beside it), else a digest of the content key."""
    if _MERGED.match(content_key):
        return content_key
    return hashlib.sha256(f"eval-model:{content_key}".encode()).hexdigest()[:KEY_LENGTH]


def _key(fields: dict[str, str]) -> str:
    payload = json.dumps({"schema": _SCHEMA, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def looks_like_key(text: str) -> bool:
    """True for a hex string that could be a key or a unique key prefix."""
    return bool(_KEY.match(text))


def pick_key(prefix: str, matches: Collection[str], kind: str, where: object) -> str:
    """The one stored key that ``prefix`` names among ``matches`` (the keys of ``kind``
    in the store at ``where`` that start with it).

    Raises:
        ArtifactNotFoundError, AmbiguousKeyError.
    """
    if not matches:
        raise ArtifactNotFoundError(
            f"no {kind[:-1]} with key {prefix!r} in {where}; `realign ls` lists them"
        )
    if len(matches) > 1 and prefix not in matches:
        raise AmbiguousKeyError(
            f"key prefix {prefix!r} matches {len(matches)} artifacts; give more characters"
        )
    return prefix if prefix in matches else next(iter(sorted(matches)))
