"""Model references: ``/local/dir``, ``hf:org/name@revision``, ``s3://bucket/prefix``.

A reference is parsed without IO; :func:`resolve_ref` turns it into a local
directory, pinning Hub revisions to commit hashes and fetching only safetensors,
JSON, tokenizer and chat-template files (see :mod:`app.residuals.hub`: the weights
only once the disk has room for them). A model that ships code (``auto_map``,
``*.py``) is refused there, before any weight is read or downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.core.errors import InvalidRefError, ModelNotFoundError, UnsafeCheckpointError
from app.residuals.checkpoint import PICKLE_SUFFIXES
from app.residuals.remote_code import check_remote_code

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REV = re.compile(r"^[\w./-]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
HUB_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]


class ModelRef(BaseModel):
    """A parsed model reference."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["local", "hf", "s3"]
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``hf:org/name[@rev]`` or a filesystem path.

        Raises:
            InvalidRefError: the text is empty or not a supported reference.
        """
        text = text.strip()
        if not text:
            raise InvalidRefError("empty model reference; give a directory or hf:org/name@rev")
        if any(ord(ch) < 32 for ch in text):
            raise InvalidRefError(f"{text!r}: control characters are not allowed in a reference")
        if text.startswith("hf:"):
            repo, _, rev = text[3:].partition("@")
            if not _REPO.match(repo):
                raise InvalidRefError(f"{text!r}: Hub references look like hf:org/name@revision")
            if rev and not _REV.match(rev):
                raise InvalidRefError(f"{text!r}: invalid revision {rev!r}")
            return cls(kind="hf", repo=repo, revision=rev or "main")
        if text.startswith("s3://"):
            return cls._parse_s3(text)
        if "://" in text:
            scheme = text.split("://", 1)[0]
            raise InvalidRefError(
                f"{text!r}: {scheme}:// references are not supported; copy the model to a "
                "local directory, or use hf:org/name@revision or s3://bucket/prefix"
            )
        try:
            return cls(kind="local", path=Path(text).expanduser())
        except RuntimeError as exc:  # ~user that does not exist
            raise InvalidRefError(f"{text!r}: {exc}") from None

    @classmethod
    def _parse_s3(cls, text: str) -> ModelRef:
        """``s3://bucket/prefix`` (a model directory in a bucket), optionally pinned to
        its content by ``@sha256:<digest>``."""
        where, _, pin = text[5:].partition("@")
        bucket, _, prefix = where.partition("/")
        if not _BUCKET.match(bucket) or not prefix.strip("/"):
            raise InvalidRefError(
                f"{text!r}: object store references look like s3://bucket/path/to/model"
            )
        if pin and not _S3_PIN.match(pin):
            raise InvalidRefError(f"{text!r}: a pin looks like @sha256:<64 hex digits>")
        return cls(kind="s3", repo=f"{bucket}/{prefix.strip('/')}", revision=pin or None)

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.repo}@{self.revision}"
        if self.kind == "s3":
            return f"s3://{self.repo}" + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


class ResolvedModel(BaseModel):
    """A reference made concrete: a local directory, and for Hub refs the commit."""

    model_config = ConfigDict(frozen=True)

    ref: str
    path: Path
    commit: str | None = None


def refuse_pickle_only(filenames: list[str], where: str) -> None:
    """Raise when a file list has pickled weights but no safetensors.

    Raises:
        UnsafeCheckpointError: only pickled weights are present.
    """
    if any(f.endswith(".safetensors") for f in filenames):
        return
    pickled = [f for f in filenames if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise UnsafeCheckpointError(
            f"{where} has weights only as {', '.join(sorted(pickled)[:3])}: pickled checkpoints "
            "can run arbitrary code when loaded, so Realign reads safetensors only — use a "
            "revision that has *.safetensors or convert the weights first"
        )


def resolve_ref(
    ref: ModelRef,
    sources_dir: Path,
    token: str | None = None,
    trusted_code: Collection[str] = (),
) -> ResolvedModel:
    """Make a reference local.

    Args:
        ref: the parsed reference.
        sources_dir: where Hub downloads are cached (``models_cache/sources``).
        token: Hub token for gated repositories.
        trusted_code: code hashes an administrator allowed (see ``remote_code``).

    Raises:
        ModelNotFoundError: the directory or repository does not exist.
        UnsafeCheckpointError: the repository has only pickled weights.
        RemoteCodeError: the model ships code (``auto_map``, ``*.py``) not allowed.
    """
    if ref.kind == "local":
        assert ref.path is not None
        path = ref.path.resolve()
        if not path.exists():
            raise ModelNotFoundError(f"{ref.path}: no such directory")
        check_remote_code(path, str(ref), trusted_code)
        return ResolvedModel(ref=str(ref), path=path)
    if ref.kind == "s3":
        raise InvalidRefError(f"{ref}: object store references are resolved by the store")
    return _resolve_hub(ref, sources_dir, token, trusted_code)


def _resolve_hub(
    ref: ModelRef, sources_dir: Path, token: str | None, trusted_code: Collection[str]
) -> ResolvedModel:
    from app.residuals.hub import resolve_hub

    pinned, path, commit = resolve_hub(ref, sources_dir, token, trusted_code)
    return ResolvedModel(ref=pinned, path=path, commit=commit)
