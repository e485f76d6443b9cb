"""``realign`` command line: compute, apply and merge instruction residuals; run the
service and its workers."""

from __future__ import annotations

from typing import Annotated

import typer

from app import __version__
from app.cli import engine, service  # noqa: F401  (commands register on import)
from app.cli.common import app, out
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
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """Realign command line."""
    try:
        level = get_settings().log_level
    except InvalidSettingsError:
        level = "INFO"  # the command that reads the settings reports it, in one line
    configure_logging("DEBUG" if verbose else level)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="realign")
