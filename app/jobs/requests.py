"""What a merge spec asks of the merge API beyond refs: its residuals as the API takes
them, and the checks of its method, parameters and weights that the service makes at
submission (a 400 before anything is queued) and the worker makes again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core.errors import InvalidParameterError
from app.jobs.models import MergeSpec

if TYPE_CHECKING:
    from app.merge import ResidualInput


def residual_inputs(spec: MergeSpec) -> list[ResidualInput] | None:
    """The spec's ``residuals`` as the merge API takes them (None: one residual)."""
    from app.merge import ResidualInput

    return [ResidualInput(**r.model_dump()) for r in spec.residuals] or None


def check_in_engine(spec: MergeSpec) -> None:
    """In-engine serving merges by task arithmetic, one residual at weight 1.

    Raises:
        InvalidParameterError: another method, parameters, or several residuals.
    """
    if spec.method != "task_arithmetic" or spec.params or spec.residuals:
        raise InvalidParameterError(
            "serve_mode 'in_engine' merges one residual by task_arithmetic while the engine "
            f"loads it; method {spec.method!r}, method params or several residuals need "
            "serve_mode 'checkpoint'"
        )


def check_method(spec: MergeSpec) -> None:
    """The spec's method exists and takes its parameters; its residuals' weights are
    usable; in-engine serving is asked only of what it can merge.

    Raises:
        InvalidParameterError: what is wrong and what the method takes.
    """
    from app.pipeline.request import check_request, inputs_of

    if spec.target is None:
        from app.residuals.methods import METHODS

        if spec.method not in METHODS:
            known = ", ".join(sorted(METHODS))
            raise InvalidParameterError(f"unknown merge method {spec.method!r}; known: {known}")
        if spec.params or spec.residuals:
            raise InvalidParameterError(
                "a residual-only job takes no params or residuals: those apply when a "
                "residual is merged into a target"
            )
        return
    inputs = inputs_of(spec.residual, spec.base, spec.instruct, residual_inputs(spec))
    check_request(spec.method, dict(spec.params), inputs)
    if spec.serve and spec.serve_mode == "in_engine":
        check_in_engine(spec)
