"""Optional dependency groups a command needs, checked before it starts."""

from __future__ import annotations

import importlib
from typing import NoReturn

from app.core.errors import MissingExtraError, install_hint

# The modules each extra of pyproject.toml provides that commands import.
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "celery", "redis", "httpx", "prometheus_client"),
    "demo": ("fastapi", "uvicorn", "httpx", "openai", "lm_eval"),
    # lm-eval with its IFEval checkers, its API client and its hf model; the engine's
    # loopback endpoint
    "eval": ("lm_eval", "langdetect", "immutabledict", "tenacity", "fastapi", "uvicorn", "httpx"),
}


def require(command: str, extra: str) -> None:
    """Import what ``realign <command>`` needs from ``extra``, or fail with one line.

    Raises:
        typer.Exit: status 1, after printing one line that names the extra and the pip
            command that installs it.
    """
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            report(missing(command, extra, exc.name or module))


def report(error: MissingExtraError) -> NoReturn:
    """Print ``error`` as one line (verbatim: ``[serve]`` is no markup) and exit 1."""
    from app.cli.common import fail

    raise fail(error.message, 1)


def missing(command: str, extra: str, module: str) -> MissingExtraError:
    """The one-line error for ``realign <command>`` without ``extra``."""
    return MissingExtraError(
        f"realign {command} needs the '{extra}' extra ({module} is not installed): "
        f"{install_hint(extra)}"
    )
