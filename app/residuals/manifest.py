"""Manifests: what a residual pack or a merged model is made of (frozen values)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RESIDUAL_MANIFEST = "manifest.json"
MERGE_MANIFEST = "realign.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class FileEntry(_Frozen):
    size: int
    sha256: str | None = None


class SourceInfo(_Frozen):
    """Identity of one input model."""

    ref: str = Field(description="The reference as resolved (Hub refs pinned to a commit).")
    path: str
    commit: str | None = None
    digest: str = Field(description="sha256 over the sorted (file, sha256) pairs.")
    files: dict[str, FileEntry]


class FamilyInfo(_Frozen):
    model_type: str
    architectures: list[str]
    structure: dict[str, Any]


class ResidualTensor(_Frozen):
    shape: tuple[int, ...]
    dtype: str
    common_rows: int = Field(
        description="Rows combined with the base; rows past it are "
        "instruct rows taken verbatim (added vocabulary)."
    )
    norm: float
    max_abs: float


class VocabInfo(_Frozen):
    base_rows: int
    instruct_rows: int
    policy: Literal["append-instruct-rows"] = "append-instruct-rows"
    tensors: list[str]


def _now() -> datetime:
    return datetime.now(UTC)


class ResidualManifest(_Frozen):
    """Everything needed to apply a residual pack to a compatible base."""

    format: Literal["realign.residual/1"] = "realign.residual/1"
    key: str | None = None
    method: str
    dtype: str
    compute_dtype: str = "float32"
    tool_version: str
    created_at: datetime = Field(default_factory=_now)
    instruct: SourceInfo
    base: SourceInfo
    family: FamilyInfo
    tied_embeddings: bool
    vocab: VocabInfo | None = None
    tensors: dict[str, ResidualTensor]
    copied: list[str] = Field(description="Non-float tensors, taken from the target on apply.")
    special_tokens: dict[str, Any]
    assets: list[str]
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


class MergeManifest(_Frozen):
    """Provenance of a merged model directory."""

    format: Literal["realign.merge/1"] = "realign.merge/1"
    method: str
    alpha: float
    fused: bool = Field(description="Computed in one pass without storing the residual.")
    residual_key: str | None
    residual_dtype: str | None
    instruct: SourceInfo
    base: SourceInfo
    target: SourceInfo
    tool_version: str
    created_at: datetime = Field(default_factory=_now)
    vocab: VocabInfo | None = None
    files: dict[str, FileEntry] = Field(default_factory=dict)
    other_files: dict[str, FileEntry] = Field(
        default_factory=dict,
        description="Config, tokenizer and generation files with their sha256 (all but "
        "the weights, this manifest and README.md), checked when the model is reused.",
    )


def write_json(path: Path, model: BaseModel) -> None:
    """Write a manifest as pretty JSON."""
    path.write_text(model.model_dump_json(indent=2) + "\n")


def read_residual_manifest(directory: Path) -> ResidualManifest:
    """Load ``manifest.json`` of a residual pack."""
    return ResidualManifest.model_validate(json.loads((directory / RESIDUAL_MANIFEST).read_text()))
