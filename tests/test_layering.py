"""House rule 1: the core and the store import no web, queue or serving framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.demo.tiny import TinyTriple
from app.residuals import native

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


def test_merge_commands_run_without_torch(llama_triple: TinyTriple, tmp_path: Path) -> None:
    """`realign merge|compute|apply` never import torch on the CPU path: its import is
    a third of a small merge's wall time, and the native kernel does the math."""
    root = Path(__file__).resolve().parents[1]
    t = llama_triple
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.cli import app\n"
        "def run(*args):\n"
        "    try:\n"
        "        app(list(args))\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        f"s = {str(tmp_path / 'store')!r}\n"
        f"run('merge', '-b', {str(t.base)!r}, '-i', {str(t.instruct)!r}, "
        f"'-t', {str(t.new_base)!r}, '--out', {str(tmp_path / 'm')!r}, '--store', s, '-q')\n"
        f"run('merge', '-b', {str(t.base)!r}, '-i', {str(t.instruct)!r}, "
        f"'-t', {str(t.new_base)!r}, '--out', {str(tmp_path / 'f')!r}, '--store', s, "
        "'--no-cache', '-q')\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "print('heavy modules:', ','.join(heavy))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert res.stdout.splitlines()[-1] == "heavy modules: ", res.stdout
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "f" / "config.json").is_file()


def test_kernel_is_built() -> None:
    """The test command needs the kernel (a C compiler and Python's headers are part of
    the set-up): a kernel that silently failed to build would leave its tests proving
    nothing. Installs without a compiler run on the torch fallback, tested through
    TorchCpuBackend in tests/residuals/test_backends.py."""
    assert native.available(), native.load_error()


def _imported_by(packages: tuple[str, ...], prefixes: tuple[str, ...]) -> list[str]:
    """Modules under ``prefixes`` that importing every module of ``packages`` loads."""
    root = Path(__file__).resolve().parents[1]
    modules = sorted(
        ".".join(p.relative_to(root).with_suffix("").parts)
        for pkg in packages
        for p in (root / pkg).glob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({prefixes!r}))\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert len(modules) >= 2
    return [m for m in res.stdout.strip().split(",") if m]


def test_serving_imports_neither_the_api_nor_the_jobs() -> None:
    """The serving plane meets the job plane only through app.handoff (records and
    messages), and owns the OpenAI protocol instead of borrowing the API's schemas."""
    assert _imported_by(("app/serving", "app/handoff"), ("app.api", "app.jobs", "workers")) == []


def test_jobs_import_no_serving_or_engines() -> None:
    assert _imported_by(("app/jobs",), ("app.serving", "app.engines", "app.api")) == []


def test_the_job_plane_loads_no_engine(tmp_path: Path) -> None:
    """`realign serve --role api` builds and starts the app (lifespan included) without
    importing vLLM, an engine or the serving plane."""
    from tests.jobs.conftest import RedisServer

    root = Path(__file__).resolve().parents[1]
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.api.app import create_app\n"
        "from app.core.settings import Settings\n"
        f"s = Settings(serve_role='api', redis_url={server.url!r}, "
        f"models_cache_dir={str(tmp_path / 'store')!r})\n"
        "with TestClient(create_app(s)) as c:\n"
        "    assert c.get('/healthz').status_code == 200\n"
        "    assert c.get('/v1/models').status_code == 404\n"
        "    assert c.get('/v1/merges').status_code == 200\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'vllm' or "
        "m.startswith(('app.engines', 'app.serving.service', 'app.serving.chat')))\n"
        "print('engines:', ','.join(bad))\n"
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    finally:
        server.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[-1] == "engines: ", res.stdout
