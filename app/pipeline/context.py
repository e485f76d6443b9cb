"""What every verb runs with: the caller's ``Settings`` and the store built from them.

Settings are read once by the caller (CLI, job runner, API) and passed down; nothing
below here reads the environment.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import InvalidParameterError
from app.core.settings import Settings
from app.residuals.checkpoint import Checkpoint
from app.residuals.dtypes import PACK_DTYPES, DType
from app.residuals.exact import to_f32
from app.residuals.progress import CancelFlag, ProgressCallback
from app.residuals.refs import ResolvedModel
from app.residuals.sources import RunOptions
from app.store.base import Store
from app.store.factory import store_from_settings
from app.store.inputs import (
    Need,
    check_download_room,
    download_bytes,
    inspect_input,
    resolve_input,
)

DTYPES = PACK_DTYPES
StoreArg = Store | Path | str | None


@dataclass(frozen=True)
class Ctx:
    """The settings a verb was given and the store they configure (opened on first
    use, inside the verb, so a full disk there is reported like any other)."""

    settings: Settings
    given: StoreArg = None

    @functools.cached_property
    def store(self) -> Store:
        return open_store(self.given, self.settings)

    @property
    def root(self) -> Path:
        """The store's local directory (where a full disk is reported), known without
        opening the store."""
        if isinstance(self.given, str | Path):
            return Path(self.given)
        if self.given is not None:
            return self.given.root
        return self.settings.models_cache_dir

    def resolve(self, ref: str) -> ResolvedModel:
        """A model reference made local (Hub and ``s3://`` refs downloaded, pinned)."""
        return resolve_input(ref, self.store, self.settings.trusted_code_sha256)

    def headers(self, ref: str) -> Checkpoint:
        """The model of ``ref``, headers only, to preflight: a Hub ref's weights are not
        downloaded (their headers are read by ranges). Use it as a context manager."""
        return inspect_input(ref, self.store, self.settings.trusted_code_sha256)

    def fetch(
        self, refs: Sequence[str], outputs: Callable[..., Iterable[Need]]
    ) -> list[ResolvedModel]:
        """``refs`` made local. When Hub weights must be downloaded first, the disks are
        checked before: the download, and ``outputs(*checkpoints)`` (where the caller
        will write how many bytes, from the refs' headers), plus 10 %, must fit.

        Raises:
            InsufficientStorageError: they do not fit; nothing was downloaded.
        """
        missing = download_bytes(refs, self.store)
        if missing:
            with contextlib.ExitStack() as stack:
                heads = [stack.enter_context(self.headers(r)) for r in refs]
                out = list(outputs(*heads))
            check_download_room(self.store, missing, out)
        return [self.resolve(r) for r in refs]

    def options(
        self,
        device: str,
        progress: ProgressCallback | None,
        cancel: CancelFlag | None,
        max_shard_gb: float | None,
        hash_outputs: bool = True,
    ) -> RunOptions:
        """Run options from the call's arguments and the settings."""
        s = self.settings
        shard = max_shard_gb if max_shard_gb is not None else s.max_shard_gb
        return RunOptions(
            device=device,
            progress=progress,
            cancel=cancel,
            max_shard_bytes=int(shard * 1024**3),
            hash_outputs=hash_outputs,
            max_read_bps=s.max_read_mbps * 1e6 if s.max_read_mbps else None,
        )


def open_store(store: StoreArg, settings: Settings) -> Store:
    """``store`` itself, the local store directory it names, or the configured one."""
    if store is None:
        return store_from_settings(settings)
    if isinstance(store, str | Path):
        return store_from_settings(settings, Path(store))
    return store


def check_alpha(alpha: float) -> None:
    """Refuse a scale the fp32 math cannot hold, before any heavy work."""
    if not math.isfinite(to_f32(alpha)):  # the math scales in fp32
        raise InvalidParameterError(
            f"alpha must be a finite number within fp32 range (|alpha| < 3.4e38), not {alpha!r}"
        )


def dtype_of(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidParameterError(
            f"the residual pack format (--pack/--dtype) must be one of {', '.join(DTYPES)} "
            f"(bf16, fp16, fp32 for short), not {name!r}"
        ) from None
