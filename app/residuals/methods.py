"""Merge methods: the tensor math, behind a registry.

A method defines element-wise operations of a few kinds (``residual``, ``apply``,
``fused``; ``convert`` is a plain dtype change). Every kind returns each element
correctly rounded, once, to the output dtype: fp32 math whose double rounding is
removed (see :mod:`app.residuals.torch_math`). # fp32 then one cast: alpha-scaling in
bf16 would round twice. Methods that the native kernel implements set ``native``;
the torch implementation serves the CUDA backend, the CPU fallback and in-engine
merges, with the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from app.core.errors import InvalidRefError

if TYPE_CHECKING:
    import torch


class MergeMethod(Protocol):
    """How a residual is formed from (instruct, base) and applied to a target."""

    name: str
    description: str
    native: bool  # the native CPU kernel implements this method

    def combine(
        self, kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One kind of step on 1-D tensors: ``residual`` (instruct, base), ``apply``
        (residual, target), ``fused`` (instruct, base, target) or ``convert`` (x).

        Returns:
            The result in ``out_dtype`` and the fp32 values its statistics are taken from.
        """


class TaskArithmetic:
    """Task arithmetic: ``R = instruct - base``; ``new = target + alpha * R``.

    ``fused`` equals ``residual`` then ``apply`` with an fp32 residual, element for
    element, whenever ``instruct - base`` is exact in fp32 (bf16 or fp16 weights
    within a factor 2**15 of each other); both are the exact value rounded once.
    """

    name = "task_arithmetic"
    description = "new = target + alpha * (instruct - base)"
    native = True

    def combine(
        self, kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from app.residuals.torch_math import combine

        return combine(kind, xs, alpha, out_dtype)


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry under ``method.name``."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name.

    Raises:
        InvalidRefError: no such method.
    """
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise InvalidRefError(f"unknown merge method {name!r}; known: {known}") from None


register_method(TaskArithmetic())
