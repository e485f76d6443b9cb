"""Intel AMX for vLLM's CPU kernels.

Linux grants a process the AMX tile state only when it asks (``arch_prctl`` with
``ARCH_REQ_XCOMP_PERM``). vLLM's CPU attention runs bf16 on AMX tiles whenever the CPU
has them, without asking; unless something in the process asked first (oneDNN does,
lazily, for its own kernels), its worker dies of SIGILL at the first generation. The
worker-extension module (:mod:`app.engines.vllm`, imported in every vLLM worker process)
asks when it is imported.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx() -> bool:
    """Ask the kernel for the AMX tile state for this process; True when granted (False
    on other systems, CPUs without AMX, kernels older than 5.16)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False
