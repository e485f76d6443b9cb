"""Progress reporting and cooperative cancellation for long tensor streams."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running stage.

    ``bytes_*`` count output bytes written; ``tensors_done`` counts finished tensors.
    """

    stage: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    tensor: str = ""

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


ProgressCallback = Callable[[Progress], None]
"""Called from a worker thread after every chunk; may raise
:class:`~app.core.errors.OperationCancelledError` to stop the work."""

CancelFlag = threading.Event
"""Set it from any thread to stop work at the next chunk boundary."""
