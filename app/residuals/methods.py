"""Merge methods: the tensor math, behind a registry.

A method defines element-wise operations of a few kinds (``residual``, ``apply``,
``fused``; ``convert`` is a plain dtype change). Every kind returns each element
correctly rounded, once, to the output dtype: fp32 math whose double rounding is
removed (see :mod:`app.residuals.torch_math`). # fp32 then one cast: alpha-scaling in
bf16 would round twice. Methods that the native kernel implements set ``native``;
the torch implementation serves the CUDA backend, the CPU fallback and in-engine
merges, with the same bits.

Methods that transform whole residual tensors at apply time (TIES trims by a per-tensor
magnitude threshold, DARE drops at random: :mod:`app.residuals.sparsify`) set
``per_tensor``: they run on the tensor-by-tensor path (:mod:`app.residuals.multi`), which
also combines several residuals in one pass. Their packs are task-arithmetic packs
(``R = instruct - base``), so one stored pack serves every method and parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from app.core.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

Params = dict[str, float | int]
"""A method's parameters, checked and with its defaults filled in (keyed into merges)."""


class MergeMethod(Protocol):
    """How a residual is formed from (instruct, base) and applied to a target."""

    name: str
    description: str
    native: bool  # the native CPU kernel implements this method
    per_tensor: bool  # needs whole residual tensors: runs on the tensor-by-tensor path

    def combine(
        self, kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One kind of step on 1-D tensors: ``residual`` (instruct, base), ``apply``
        (residual, target), ``fused`` (instruct, base, target) or ``convert`` (x).

        Returns:
            The result in ``out_dtype`` and the fp32 values its statistics are taken from.
        """

    def check_params(self, params: Mapping[str, object]) -> Params:
        """The method's parameters with defaults filled in.

        Raises:
            InvalidParameterError: an unknown parameter or a value out of range.
        """

    def merge(
        self, deltas: Sequence[torch.Tensor], weights: Sequence[float], params: Params, name: str
    ) -> torch.Tensor:
        """Merge one tensor's residuals (fp32, 1-D, equal length, one per residual, in
        order) into one fp32 delta; ``name`` is the tensor's (seeds random methods)."""


class TaskArithmetic:
    """Task arithmetic: ``R = instruct - base``; ``new = target + alpha * R``.

    Every kind gives the exact value rounded once. An exact pack (the default) is
    applied by ``fused`` itself, its ``(p, neg)`` standing for ``(instruct, base)``, so a
    merge from it equals the fused merge element for element, whatever the dtypes. A
    rounded pack: ``residual`` then ``apply`` equal ``fused`` with an fp32 residual
    whenever ``instruct - base`` is exact in fp32 (bf16 or fp16 weights within a factor
    2**15 of each other); a bf16 or fp16 residual rounds R, so the merge is exact for
    that R, not for ``instruct - base``.
    """

    name = "task_arithmetic"
    description = "new = target + alpha * (instruct - base)"
    native = True
    per_tensor = False

    def combine(
        self, kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from app.residuals.torch_math import combine

        return combine(kind, xs, alpha, out_dtype)

    def check_params(self, params: Mapping[str, object]) -> Params:
        from app.residuals.sparsify import check_params

        return check_params(self.name, params, {})

    def merge(
        self, deltas: Sequence[torch.Tensor], weights: Sequence[float], params: Params, name: str
    ) -> torch.Tensor:
        """The weighted sum, in fp32, in residual order (one residual of weight 1: R)."""
        from app.residuals.sparsify import weighted_sum

        return weighted_sum(deltas, weights)


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry under ``method.name``."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name.

    Raises:
        InvalidParameterError: no such method.
    """
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise InvalidParameterError(f"unknown merge method {name!r}; known: {known}") from None


def pack_method(name: str) -> str:
    """The method whose residual a pack of merges by ``name`` stores: methods that
    transform R at apply time share the task-arithmetic pack ``instruct - base``."""
    return TaskArithmetic.name if get_method(name).per_tensor else name


def _register_builtin() -> None:
    from app.residuals.sparsify import Dare, Ties

    for method in (TaskArithmetic(), Ties(), Dare()):
        register_method(method)


_register_builtin()
