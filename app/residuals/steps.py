"""One chunk's math as a short list of steps, handed to a math backend at once.

A chunk of the streaming pipeline may need two results from the same inputs: the
residual and the merged model written from it in one pass. Given both steps together, a
device backend keeps the first result on the device for the second (a :class:`Prior`
operand) instead of sending it to the host and back, and may return before the work is
done: the caller waits on the :class:`Pending` before it reads the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.residuals.dtypes import DType
from app.residuals.methods import MergeMethod

Operand = tuple[memoryview, DType]
Stats = tuple[float, float]
"""(sum of squares, max |x|) of a step's fp32 result; zeros where not asked for."""


@dataclass(frozen=True)
class Prior:
    """An operand that is the output of an earlier step of the same chunk."""

    index: int


@dataclass(frozen=True)
class Step:
    """One element-wise combine of a chunk (see :meth:`MergeMethod.combine`).

    Attributes:
        kind: ``residual``, ``apply``, ``fused`` or ``convert``.
        operands: host bytes with their dtype, or earlier steps' outputs.
        out: host bytes the result is written to.
        out_dtype: the result's dtype.
        alpha: residual scale (``apply``, ``fused``).
        want_stats: whether to return the statistics of the fp32 result.
    """

    kind: str
    operands: tuple[Operand | Prior, ...]
    out: memoryview
    out_dtype: DType
    alpha: float = 1.0
    want_stats: bool = False


class Pending(Protocol):
    """Steps handed to a backend; their outputs are in host memory once ``wait`` returns."""

    def wait(self) -> list[Stats]:
        """Block until every step's output is written; return each step's statistics."""


@dataclass(frozen=True)
class Done:
    """Steps that ran before they were returned (the CPU backends)."""

    stats: list[Stats]

    def wait(self) -> list[Stats]:
        return self.stats


class Combiner(Protocol):
    """The synchronous one-step call every backend has (``MathBackend.combine``)."""

    def __call__(
        self,
        method: MergeMethod,
        kind: str,
        inputs: Sequence[Operand],
        out: memoryview,
        out_dtype: DType,
        alpha: float,
        *,
        want_stats: bool,
    ) -> Stats: ...


def host_operands(step: Step, steps: Sequence[Step]) -> list[Operand]:
    """``step``'s operands with each :class:`Prior` replaced by that step's host output."""
    return [
        (steps[op.index].out, steps[op.index].out_dtype) if isinstance(op, Prior) else op
        for op in step.operands
    ]


def check_steps(steps: Sequence[Step]) -> None:
    """Refuse a step that reads the output of a step that does not precede it."""
    for i, step in enumerate(steps):
        if any(isinstance(op, Prior) and not 0 <= op.index < i for op in step.operands):
            raise ValueError(f"step {i} ({step.kind}) reads a step that does not precede it")


def run_steps(combine: Combiner, method: MergeMethod, steps: Sequence[Step]) -> Done:
    """Run ``steps`` one after the other with ``combine``, each reading earlier steps'
    outputs from host memory.

    Args:
        combine: a backend's synchronous combine.
        method: the merge method.
        steps: the chunk's steps, in order (a :class:`Prior` names an earlier one).

    Returns:
        The finished steps' statistics.
    """
    check_steps(steps)
    stats = []
    for step in steps:
        ops = host_operands(step, steps)
        stats.append(
            combine(
                method, step.kind, ops, step.out, step.out_dtype, step.alpha,
                want_stats=step.want_stats,
            )
        )  # fmt: skip
    return Done(stats)
