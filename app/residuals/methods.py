"""Merge methods: the tensor math, behind a registry.

A method defines three element-wise operations on fp32 accumulators. They run on
chunks of any size and on any device; the caller casts the accumulator once to
the output dtype. # fp32 then one cast: alpha-scaling in bf16 would round twice.
"""

from __future__ import annotations

from typing import Protocol

import torch

from app.core.errors import InvalidRefError


class MergeMethod(Protocol):
    """How a residual is formed from (instruct, base) and applied to a target."""

    name: str
    description: str

    def residual(self, acc: torch.Tensor, instruct: torch.Tensor, base: torch.Tensor) -> None:
        """acc <- R(instruct, base)."""

    def apply(
        self, acc: torch.Tensor, residual: torch.Tensor, target: torch.Tensor, alpha: float
    ) -> None:
        """acc <- target + alpha * residual."""

    def fused(
        self,
        acc: torch.Tensor,
        instruct: torch.Tensor,
        base: torch.Tensor,
        target: torch.Tensor,
        alpha: float,
    ) -> None:
        """acc <- apply(residual(instruct, base), target), identical to the two-step result
        with an fp32 residual."""


class TaskArithmetic:
    """Task arithmetic: ``R = instruct - base``; ``new = target + alpha * R``."""

    name = "task_arithmetic"
    description = "new = target + alpha * (instruct - base)"

    def residual(self, acc: torch.Tensor, instruct: torch.Tensor, base: torch.Tensor) -> None:
        acc.copy_(instruct)
        acc.sub_(base)

    def apply(
        self, acc: torch.Tensor, residual: torch.Tensor, target: torch.Tensor, alpha: float
    ) -> None:
        acc.copy_(residual)
        if alpha != 1.0:
            acc.mul_(alpha)
        acc.add_(target)

    def fused(
        self,
        acc: torch.Tensor,
        instruct: torch.Tensor,
        base: torch.Tensor,
        target: torch.Tensor,
        alpha: float,
    ) -> None:
        # Same operation order as residual() then apply(): bit-identical to the
        # cached path when the residual is kept in fp32.
        self.residual(acc, instruct, base)
        if alpha != 1.0:
            acc.mul_(alpha)
        acc.add_(target)


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
