"""Logging set-up shared by the CLI, the API and the workers."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def configure_logging(level: str = "INFO") -> None:
    """Send ``app.*`` logs to stderr through rich, once per process."""
    root = logging.getLogger("app")
    if root.handlers:
        root.setLevel(level.upper())
        return
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
