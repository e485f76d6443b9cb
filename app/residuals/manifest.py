"""Manifests: what a residual pack or a merged model is made of (frozen values)."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import ArtifactCorruptError
from app.residuals.integrity import XXH3, ReadVerifier, mismatch_message, xxh3_hex

RESIDUAL_MANIFEST = "manifest.json"
MERGE_MANIFEST = "realign.json"
# A manifest decides what a pack or model becomes (special tokens, vocabulary rows,
# file hashes): it carries the sha256 of its own bytes, taken with this field zeroed.
SEAL = "manifest_sha256"
_UNSEALED = b"0" * 64


class _Written(Protocol):
    """What a shard writer reports per file."""

    sizes: dict[str, int]
    sha256: dict[str, str]
    xxh3: dict[str, str]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class FileEntry(_Frozen):
    size: int
    sha256: str | None = None
    xxh3_128: str | None = Field(
        default=None, description="XXH3-128 of the bytes: the checksum verified on every read."
    )

    @property
    def checksum(self) -> str | None:
        """What a ``ReadVerifier`` checks this file against: its XXH3-128 when recorded
        (fast), else its sha256; None for a file recorded without either."""
        return XXH3 + self.xxh3_128 if self.xxh3_128 else self.sha256


def written_entries(writer: _Written) -> dict[str, FileEntry]:
    """The entries of the files a writer wrote (hashed while written, if it hashed)."""
    return {
        n: FileEntry(size=s, sha256=writer.sha256.get(n), xxh3_128=writer.xxh3.get(n))
        for n, s in writer.sizes.items()
    }


def file_entry(path: Path) -> FileEntry:
    """Size, sha256 and XXH3-128 of a small file written next to the weights."""
    data = path.read_bytes()
    return FileEntry(
        size=len(data), sha256=hashlib.sha256(data).hexdigest(), xxh3_128=xxh3_hex(data)
    )


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
    corrections: int | None = Field(
        default=None,
        description="Exact packs: elements whose residual is not its rounded value alone "
        "(stored as sparse corrections).",
    )


class VocabInfo(_Frozen):
    base_rows: int
    instruct_rows: int
    policy: Literal["append-instruct-rows"] = "append-instruct-rows"
    tensors: list[str]


class LineageDistance(_Frozen):
    """How far one model's sampled weights are from another's."""

    median: float = Field(
        description="Median over the sampled tensors of |model - other| / |other| (the figure "
        "the limit applies to)."
    )
    max: float = Field(description="The largest of the per-tensor figures.")
    tensors: dict[str, float] = Field(description="Relative distance per sampled tensor.")


class LineageInfo(_Frozen):
    """The lineage check of a merge: relative distances of the instruct model and the
    target from the base over a seeded sample of weight rows (see
    :mod:`app.residuals.lineage`)."""

    method: Literal["sampled-rows/1"] = "sampled-rows/1"
    rows_per_tensor: int
    seed: int
    max_distance: float = Field(
        description="The limit applied (REALIGN_LINEAGE_MAX_DISTANCE) to 'instruct-base' "
        "and 'target-base'; 'target-instruct' is recorded, not limited."
    )
    forced: bool = Field(description="The check was overridden (--force / force: true).")
    passed: bool = Field(description="Every limited distance measured is within the limit.")
    distances: dict[str, LineageDistance] = Field(
        description="By pair: 'instruct-base', 'target-base', 'target-instruct' (a merge of "
        "several residuals: the pairs of each, as 'residuals[<i>] target-base')."
    )
    skipped: list[str] = Field(
        default_factory=list, description="What could not be measured, and why."
    )

    def summary(self) -> str:
        """One line: ``instruct-base 0.012, target-base 0.031 (limit 0.8)``, with what was
        forced or not measured."""
        figures = ", ".join(f"{pair} {d.median:.3g}" for pair, d in self.distances.items())
        text = f"{figures or 'not measured'} (limit {self.max_distance:g})"
        if not self.passed:
            text += "; past the limit, merged with force"
        return "; ".join([text, *self.skipped])


class PackFidelity(_Frozen):
    """How far a lossy pack's R is from R = instruct - base, measured as it was written."""

    format: str = Field(description="The pack format (int8, int4, bitdelta).")
    bits: int = Field(description="Bits per coded element.")
    group_size: int | None = Field(
        description="Elements per fp32 scale along a row (None: one scale per row)."
    )
    scale: str = Field(description="How each scale is set: absmax or mean-abs.")
    coding: str = Field(description="The coding in words.")
    rel_error: float = Field(
        description="||R_hat - R|| / ||R|| (Frobenius) over every coded and kept element."
    )
    tensors: dict[str, float] = Field(
        description="The same figure per tensor (0 for vectors, kept in fp32)."
    )

    def summary(self) -> str:
        """``|R^-R|/|R| 0.00705 overall, worst model.embed_tokens.weight 0.0081``."""
        line = f"|R^-R|/|R| {self.rel_error:.4g} overall"
        if self.tensors:
            name, worst = max(self.tensors.items(), key=lambda kv: kv[1])
            line += f", worst {name} {worst:.4g}"
        return line


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
    fidelity: PackFidelity | None = Field(
        default=None, description="Lossy packs (int8, int4, bitdelta): the error of R."
    )

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def exact(self) -> bool:
        """Whether the pack holds R = instruct - base exactly (frames of the rounded
        residual and its corrections), rather than R rounded to ``dtype`` (lossy)."""
        return self.dtype == "exact"

    def storage(self) -> dict[str, Any]:
        """How the pack stores R: format, whether lossless, the weight files' bytes, their
        ratio to the same residual in bf16, (exact packs) the share of elements that
        needed a correction beyond the rounded value, and (int8, int4, bitdelta packs) the
        coding and the relative Frobenius error of R measured when the pack was made."""
        weights = sum(
            e.size for n, e in self.files.items() if n.endswith((".safetensors", ".frames"))
        )
        elems = sum(math.prod(t.shape) for t in self.tensors.values())
        fixed = [t.corrections for t in self.tensors.values() if t.corrections is not None]
        return {
            "format": self.dtype,
            "lossless": self.exact,
            "weight_bytes": weights,
            "bf16_ratio": round(weights / (2 * elems), 4) if elems else None,
            "corrections": round(sum(fixed) / elems, 5) if fixed and elems else None,
            "coding": self.fidelity.coding if self.fidelity else None,
            "rel_error": self.fidelity.rel_error if self.fidelity else None,
        }

    def storage_line(self) -> str:
        """:meth:`storage` for people: ``exact (lossless) 1125.3 MB, 0.51x bf16, ...``."""
        s = self.storage()
        how = "lossless" if s["lossless"] else "lossy: R rounded to " + str(s["format"])
        if s["coding"] is not None:
            how = f"lossy: {s['coding']}"
        line = f"{s['format']} ({how})  {s['weight_bytes'] / 1e6:.1f} MB"
        if s["bf16_ratio"] is not None:
            line += f"  {s['bf16_ratio']:.3f}x the bf16 pack"
        if s["corrections"] is not None:
            line += f"  corrections on {100 * s['corrections']:.2f}% of elements"
        if s["rel_error"] is not None:
            line += f"  error |R^-R|/|R| {s['rel_error']:.3g}"
        return line


class ResidualUse(_Frozen):
    """One residual of a merge by an apply-time method or of several residuals."""

    key: str | None = Field(description="The pack's store key (None: a pack directory).")
    weight: float
    dtype: str
    instruct: str = Field(description="The instruct model's reference.")
    base: str = Field(description="The base model's reference.")


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
    lineage: LineageInfo | None = Field(
        default=None,
        description="Figures of the lineage check (absent in manifests written before it).",
    )
    files: dict[str, FileEntry] = Field(default_factory=dict)
    other_files: dict[str, FileEntry] = Field(
        default_factory=dict,
        description="Config, tokenizer and generation files with their checksums (all but "
        "the weights, this manifest and README.md), checked when the model is reused.",
    )
    params: dict[str, float | int] = Field(
        default_factory=dict, description="The method's parameters, defaults filled in."
    )
    residuals: list[ResidualUse] = Field(
        default_factory=list,
        description="Every residual merged, in order, with its weight (empty: the one "
        "residual of instruct and base, weight 1). The first one's tokenizer files are used.",
    )


def write_json(path: Path, model: BaseModel) -> None:
    """Write a manifest as pretty JSON, sealed with the sha256 of its own bytes."""
    data = model.model_dump(mode="json")
    data[SEAL] = _UNSEALED.decode()
    raw = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    cut = raw.rindex(_UNSEALED)
    path.write_bytes(raw[:cut] + hashlib.sha256(raw).hexdigest().encode() + raw[cut + 64 :])


def read_sealed(path: Path) -> dict[str, Any]:
    """The fields of a sealed manifest, after checking its seal.

    Raises:
        ArtifactCorruptError: the file is not JSON, carries no seal, or its bytes do not
            match the seal (one flipped byte anywhere is enough).
        FileNotFoundError: there is no such file.
    """
    return parse_sealed(path.read_bytes(), str(path.parent), path.name)


def parse_sealed(raw: bytes, where: str, name: str) -> dict[str, Any]:
    """The fields of the sealed manifest ``raw`` (file ``name`` of artifact ``where``),
    after checking its seal (ArtifactCorruptError, as :func:`read_sealed`)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactCorruptError(
            f"{where}: {name} is not valid JSON ({exc}) — the file changed on disk", file=name
        ) from None
    if not isinstance(data, dict):
        raise ArtifactCorruptError(
            f"{where}: {name} is not a JSON object — the file changed on disk", file=name
        )
    seal = data.pop(SEAL, None)
    if not isinstance(seal, str) or len(seal) != 64:
        raise ArtifactCorruptError(
            f"{where}: {name} carries no seal (sha256 of itself): it was edited "
            "or written by an older version — build the artifact again",
            file=name,
        )
    cut = raw.rfind(seal.encode())
    unsealed = raw[:cut] + _UNSEALED + raw[cut + 64 :]
    if cut < 0 or hashlib.sha256(unsealed).hexdigest() != seal:
        raise ArtifactCorruptError(mismatch_message(where, name), file=name)
    return data


def read_residual_manifest(directory: Path, *, sealed: bool = True) -> ResidualManifest:
    """Load and check the sealed ``manifest.json`` of a residual pack (``sealed=False``:
    without the check, for a hint that is checked otherwise, e.g. the sources to rebuild
    a pack from, which must give its key again)."""
    path = directory / RESIDUAL_MANIFEST
    if sealed:
        return ResidualManifest.model_validate(read_sealed(path))
    return ResidualManifest.model_validate(json.loads(path.read_bytes()))


def read_merge_manifest(directory: Path) -> MergeManifest:
    """Load and check the sealed ``realign.json`` of a merged model."""
    return MergeManifest.model_validate(read_sealed(directory / MERGE_MANIFEST))


def verify_merged_dir(directory: Path) -> MergeManifest | None:
    """Check every file of a merged model directory against its sealed ``realign.json``
    before an engine loads it; None for a directory that is not a Realign merge.

    Raises:
        ArtifactCorruptError: the manifest or a file does not match.
    """
    if not (directory / MERGE_MANIFEST).is_file():
        return None
    manifest = read_merge_manifest(directory)
    files = {**manifest.files, **manifest.other_files}
    expected = {directory / n: (e.size, e.checksum) for n, e in files.items() if e.checksum}
    ReadVerifier(expected, str(directory)).finish()
    return manifest
