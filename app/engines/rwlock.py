"""An asyncio readers-writer lock: many generations at once, weight swaps alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RWLock:
    """Readers share; a writer waits for readers to drain and blocks new ones meanwhile
    (writer preference, so a swap is not starved by a stream of requests)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.asynccontextmanager
    async def read(self, timeout: float | None = None) -> AsyncIterator[None]:
        """Share the lock; waiting at most ``timeout`` seconds for it (TimeoutError)."""
        async with self._cond:
            async with asyncio.timeout(timeout):
                await self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_writers += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
