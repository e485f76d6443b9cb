"""Shared pieces of the pipelines: source identities, run options, tensor order."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from app.residuals.assets import asset_files
from app.residuals.checkpoint import INDEX_NAME, Checkpoint, TensorInfo, weight_files
from app.residuals.devices import make_backend
from app.residuals.hashing import FileHasher
from app.residuals.manifest import FileEntry, SourceInfo
from app.residuals.methods import get_method
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.refs import ResolvedModel
from app.residuals.stream import CHUNK_ELEMS, StreamRunner


@dataclass(frozen=True)
class RunOptions:
    """How a pipeline runs (not what it computes)."""

    device: str = "cpu"
    progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    max_shard_bytes: int = 5 * 1024**3
    chunk_elems: int = CHUNK_ELEMS
    hash_outputs: bool = True
    max_read_bps: float | None = None


def digest_of(entries: dict[str, FileEntry]) -> str:
    """One sha256 over sorted (name, sha256) pairs: the content identity of a model."""
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(f"{name}\0{entries[name].sha256}\n".encode())
    return h.hexdigest()


def describe_source(model: ResolvedModel, hasher: FileHasher) -> SourceInfo:
    """Identify a model by the content of its config, weights and tokenizer files."""
    path = model.path
    files = [path / "config.json", *weight_files(path), *asset_files(path)]
    if (path / INDEX_NAME).is_file():
        files.append(path / INDEX_NAME)
    hashes = hasher.sha256_many(f for f in files if f.is_file())
    entries = {p.name: FileEntry(size=p.stat().st_size, sha256=h) for p, h in hashes.items()}
    return SourceInfo(
        ref=model.ref,
        path=str(path),
        commit=model.commit,
        digest=digest_of(entries),
        files=entries,
    )


def file_order(tensors: dict[str, TensorInfo]) -> list[str]:
    """Tensor names in on-disk order, so every input file is read sequentially."""
    return sorted(tensors, key=lambda n: (tensors[n].file.name, tensors[n].offset))


def local_source(path: Path, hasher: FileHasher) -> SourceInfo:
    """Identity of a local model directory."""
    return describe_source(ResolvedModel(ref=str(path), path=path.resolve()), hasher)


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a model directory (headers only)."""
    return Checkpoint.open(path)


def make_runner(method: str, stage: str, opts: RunOptions) -> StreamRunner:
    """The streaming pipeline for ``method``, configured by ``opts``."""
    return StreamRunner(
        get_method(method),
        make_backend(opts.device),
        stage=stage,
        progress=opts.progress,
        cancel=opts.cancel,
        chunk_elems=opts.chunk_elems,
        max_read_bps=opts.max_read_bps,
    )
