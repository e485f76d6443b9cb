"""What a merge of residuals asks for, checked without IO: the residuals and their
weights, how the merge runs, the method and its parameters; and which requests the
streaming task-arithmetic paths run (see :mod:`app.pipeline.multi` for the others).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from app.core.errors import InvalidParameterError
from app.residuals.methods import METHODS, Params, get_method
from app.residuals.progress import CancelFlag, ProgressCallback
from app.store.recovery import Notice

MAX_RESIDUALS = 16


@dataclass(frozen=True)
class ResidualInput:
    """One residual of a merge and its weight: a stored residual (``key``: a key, a
    unique key prefix or a pack directory), or the pair ``base`` + ``instruct`` whose
    pack is computed (or reused)."""

    key: str | None = None
    base: str | None = None
    instruct: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Run:
    """How a merge runs: device, progress, cancellation, notices of rebuilt packs, and
    ``force`` past the lineage checks (of the packs it computes, and of the target
    against each residual's base)."""

    device: str = "cpu"
    progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    notice: Notice | None = None
    force: bool = False


def is_classic(
    method: str, params: dict[str, object] | None, inputs: Sequence[ResidualInput]
) -> bool:
    """Whether a request is an element-wise merge (task arithmetic, or another method
    that is not ``per_tensor``) of one residual at weight 1 without parameters: the
    streaming paths (one pass, split by output shard) run it as they always did."""
    found = METHODS.get(method)
    one = len(inputs) == 1 and inputs[0].weight == 1.0
    return found is not None and not found.per_tensor and not params and one


def inputs_of(
    residual: str | None,
    base: str | None,
    instruct: str | None,
    residuals: Sequence[ResidualInput] | None,
) -> list[ResidualInput]:
    """The residuals of a request given either way (one ``residual`` or pair, or a list).

    Raises:
        InvalidParameterError: both ways, or neither.
    """
    if residuals:
        if residual is not None or base is not None or instruct is not None:
            raise InvalidParameterError(
                "give either 'residuals' or one residual ('residual', or 'base' + "
                "'instruct'), not both"
            )
        return list(residuals)
    if residual is not None:
        return [ResidualInput(key=residual)]
    if base is None or instruct is None:
        raise InvalidParameterError("give either a residual key or both base and instruct")
    return [ResidualInput(base=base, instruct=instruct)]


def check_request(
    method: str, params: dict[str, object] | None, inputs: Sequence[ResidualInput]
) -> Params:
    """The method's checked parameters, after checking the residuals' shape and weights.

    Raises:
        InvalidParameterError: an unknown method, a bad parameter, a residual given by
            neither (or both) a key and a pair, a weight that is 0 or not finite.
    """
    checked = get_method(method).check_params(params or {})
    if not inputs or len(inputs) > MAX_RESIDUALS:
        raise InvalidParameterError(f"give 1 to {MAX_RESIDUALS} residuals, not {len(inputs)}")
    for i, r in enumerate(inputs):
        paired = r.base is not None or r.instruct is not None
        if (r.key is not None and paired) or (
            r.key is None and (r.base is None or r.instruct is None)
        ):
            raise InvalidParameterError(
                f"residuals[{i}]: give either 'key' or both 'base' and 'instruct'"
            )
        if not math.isfinite(r.weight) or r.weight == 0:
            raise InvalidParameterError(
                f"residuals[{i}]: weight must be a finite nonzero number, not {r.weight!r}"
            )
    return checked
