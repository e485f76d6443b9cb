"""Merge-method options of ``realign merge`` and ``realign apply``: ``--method``, the
named parameters (``--density``, ``--drop-rate``, ``--seed``), ``--param NAME=VALUE``,
and the weights of several residuals. A mistake in them exits 2, before any work."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import fail
from app.core.errors import InvalidParameterError

Method = Annotated[
    str,
    typer.Option(
        "--method",
        help="Merge method: task_arithmetic; ties (TIES-Merging: trim, elect sign, "
        "disjoint mean); dare (drop at random and rescale).",
    ),
]
Density = Annotated[
    float | None,
    typer.Option(
        "--density",
        help="ties: fraction of each residual tensor kept, by magnitude (default 0.2).",
        show_default=False,
    ),
]
DropRate = Annotated[
    float | None,
    typer.Option(
        "--drop-rate",
        help="dare: probability that a residual element is dropped (default 0.9).",
        show_default=False,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", help="dare: seed of the drop pattern (default 0).", show_default=False),
]
Param = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        help="A method parameter as NAME=VALUE (repeatable), e.g. --param density=0.5.",
        show_default=False,
    ),
]
Weight = Annotated[
    list[float] | None,
    typer.Option(
        "--weight",
        "-w",
        help="Weight of each --residual, in order (repeatable; default 1 each).",
        show_default=False,
    ),
]


def _number(name: str, text: str) -> float | int:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    raise fail(f"--param {name}={text}: the value must be a number", 2)


def method_params(
    method: str,
    density: float | None,
    drop_rate: float | None,
    seed: int | None,
    extra: list[str] | None,
) -> dict[str, object]:
    """The parameters the options give, checked against ``method`` (exit 2 if wrong)."""
    from app.residuals.methods import get_method

    named = {"density": density, "drop_rate": drop_rate, "seed": seed}
    params: dict[str, object] = {k: v for k, v in named.items() if v is not None}
    for item in extra or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise fail(f"--param {item!r}: give NAME=VALUE, e.g. --param density=0.5", 2)
        params[name] = _number(name, text.strip())
    try:
        get_method(method).check_params(params)
    except InvalidParameterError as exc:
        raise fail(str(exc), 2) from None
    return params


def weighted(residuals: list[str], weights: list[float] | None) -> list[tuple[str, float]]:
    """Each ``--residual`` with its ``--weight`` (exit 2 when the counts differ)."""
    if weights is None:
        return [(r, 1.0) for r in residuals]
    if len(weights) != len(residuals):
        raise fail(
            f"{len(weights)} --weight for {len(residuals)} --residual: give one weight per "
            "residual, in order, or none",
            2,
        )
    return list(zip(residuals, weights, strict=True))
