"""The AMX tile state is requested for vLLM's worker processes (its bf16 CPU attention
uses AMX without asking: SIGILL otherwise, on CPUs that have it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.engines.amx import request_amx


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " amx_tile" in cpuinfo.read_text()


def test_the_tile_state_is_granted_where_the_cpu_has_amx() -> None:
    assert request_amx() is _has_amx()


def test_importing_the_worker_extension_requests_it() -> None:
    """What a vLLM worker process does first: import the extension's module. Afterwards
    the kernel reports the tile state permitted to the process (ARCH_GET_XCOMP_PERM)."""
    code = (
        "import ctypes; import app.engines.vllm; m = ctypes.c_ulong(0); "
        "libc = ctypes.CDLL(None); libc.syscall(158, 0x1022, ctypes.byref(m)); "
        "print(bool(m.value >> 18 & 1))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == str(_has_amx())
