"""House rule 1: the core and the store import no web, queue or serving framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("fastapi", "celery", "redis", "vllm", "starlette", "uvicorn")


def test_core_and_store_stay_pure() -> None:
    root = Path(__file__).resolve().parents[1]
    modules = sorted(
        ".".join(p.relative_to(root).with_suffix("").parts)
        for pkg in ("app/residuals", "app/store")
        for p in (root / pkg).glob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "", f"core imports {res.stdout.strip()}"
    assert len(modules) > 10
