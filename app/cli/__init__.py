"""``realign`` command line: compute, apply and merge instruction residuals; run the
service and its workers."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.text import Text

from app import __version__
from app.cli import engine, evals, fidelity, packs, report, service, sweep  # noqa: F401  (commands register on import)
from app.cli.common import app, err, out
from app.core.errors import InvalidSettingsError
from app.core.logging import configure_logging
from app.core.settings import get_settings

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        out.print(f"realign {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """Realign command line. Settings come from REALIGN_* environment variables."""
    try:
        level = get_settings().log_level
    except InvalidSettingsError as exc:
        # Help needs no settings (the group's callback runs before the command's --help).
        if "--help" in (*ctx.args, *sys.argv[1:]):
            level = "INFO"
        else:
            # Verbatim (a JSON value is no markup), one line, before any command runs.
            err.print(Text.assemble(("error:", "bold red"), " ", exc.message), soft_wrap=True)
            raise typer.Exit(2) from None
    configure_logging("DEBUG" if verbose else level)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="realign")
