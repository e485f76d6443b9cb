"""What the streaming pipeline (:mod:`app.residuals.stream`) is asked to do: one job per
output tensor, its inputs, and where its outputs go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.shards import TensorSpec

JobKind = Literal["residual", "apply", "fused", "copy"]


@dataclass(frozen=True)
class Source:
    """One input tensor and the checkpoint that reads it."""

    checkpoint: Checkpoint
    info: TensorInfo


@dataclass(frozen=True)
class TensorJob:
    """How one output tensor is produced.

    Rows below ``common_rows`` combine all ``inputs`` with the method's ``kind``
    operation; rows from ``common_rows`` on are copied from ``inputs[0]`` (the
    rows an instruct model added to its vocabulary). ``copy`` jobs set it to 0.
    """

    spec: TensorSpec
    kind: JobKind
    inputs: tuple[Source, ...]
    common_rows: int
    alpha: float = 1.0
    then: FollowUp | None = None
    exact: bool = False
    """A residual job of an exact pack: each chunk's ``p`` goes to the writer with its
    rounding error (``write_pair``), and a follow-up is the fused merge of the inputs."""


class TensorWriter(Protocol):
    """Where a runner's outputs go (``ShardedWriter``, ``FramedWriter``)."""

    def write(self, name: str, data: memoryview) -> None: ...


class PairWriter(Protocol):
    """A writer of exact packs (``FramedWriter``)."""

    def write_pair(self, name: str, p: memoryview, neg: memoryview | None) -> None: ...


@dataclass(frozen=True)
class FollowUp:
    """A second output made from a job's result in the same pass: ``target + alpha *
    result`` (rows past ``common_rows``: the result itself), for a second writer —
    the merged model written while its residual is computed, with the same bits as
    applying the stored residual later."""

    spec: TensorSpec
    target: Source
    alpha: float = 1.0


@dataclass(frozen=True)
class TensorStats:
    """Statistics of a residual tensor, taken in fp32 before the cast."""

    norm: float
    max_abs: float
