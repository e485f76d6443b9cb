"""``realign fidelity``: how closely a merge from a (lossy) pack follows the exact one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import Alpha, Store, Target, app, fail, friendly, out


@app.command()
@friendly
def fidelity(
    residual: Annotated[str, typer.Argument(help="Residual key, key prefix or pack dir.")],
    target: Target,
    alpha: Alpha = 1.0,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="A text file of prompts, one a line (default: a built-in set of 8)."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Greedy tokens per prompt.")] = 32,
    work: Annotated[
        Path | None,
        typer.Option(
            "--work",
            help="Where the two merged models are written meanwhile "
            "(default: the system's temporary directory).",
        ),
    ] = None,
    store: Store = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Merge --target with the pack and with the exact residual of the pack's instruct
    and base models, then compare the two models with transformers on the CPU:
    greedy-token agreement and mean KL of next-token distributions over a fixed prompt
    set (teacher-forced on the exact model's greedy continuation).

    Example: realign fidelity "$KEY" -t new_base/ --json
    """
    from transformers.utils import logging as hf_logging

    from app.merge import fidelity as run

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    lines = None
    if prompts is not None:
        lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not lines:
            raise fail(f"{prompts} holds no prompt (one a line)", 2)
    report = run(
        residual, target, alpha=alpha, prompts=lines, max_new_tokens=tokens, work=work,
        store=store,
    )  # fmt: skip
    if as_json:
        out.print_json(report.model_dump_json())
        return
    out.print(report.line(), highlight=False, soft_wrap=True)
