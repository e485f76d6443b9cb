"""Hugging Face Hub models: pinned and listed (with file sizes), looked at through their
configs and safetensors headers, and downloaded only after a free-space check.

Validation reads what a preflight needs: the configs and tokenizer files (small,
downloaded into the Hub cache) and each weight file's header (a ranged read of its
first bytes). The weights are downloaded by the merge step, once the space they need
(what is not in the cache yet, by the listing's sizes) and the outputs' fit.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.errors import ModelNotFoundError
from app.residuals.checkpoint import INDEX_NAME, Checkpoint, read_config
from app.residuals.headers import header_of
from app.residuals.refs import HUB_PATTERNS, ModelRef, refuse_pickle_only
from app.residuals.remote_code import CODE_SUFFIX, check_remote_code
from app.residuals.space import ensure_space

RangeReader = Callable[[str, int, int], bytes]  # (file in the repo, offset, length)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
SMALL_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]


@dataclass(frozen=True)
class HubListing:
    """The files of a model at one commit, with their sizes in bytes."""

    repo: str
    commit: str
    sizes: dict[str, int]

    @property
    def ref(self) -> str:
        return f"hf:{self.repo}@{self.commit}"

    def fetched(self, patterns: Sequence[str]) -> dict[str, int]:
        """The files a download with ``patterns`` fetches (filtered as the Hub client
        filters them)."""
        from huggingface_hub.utils._paths import filter_repo_objects  # what the download uses

        names = filter_repo_objects(self.sizes, allow_patterns=list(patterns))
        return {name: self.sizes[name] for name in names}

    def weights(self, snapshot: Path) -> list[str]:
        """The weight files a checkpoint reads: those its index names (the index is
        among the small files in ``snapshot``), else every top-level ``*.safetensors``."""
        index = snapshot / INDEX_NAME
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return sorted(n for n in self.sizes if n.endswith(".safetensors") and "/" not in n)


def list_hub(ref: ModelRef, token: str | None = None) -> HubListing:
    """The commit ``ref``'s revision points at and its files with sizes (one API call;
    a pinned commit's listing is kept, as it cannot change).

    Raises:
        ModelNotFoundError: no such repository or revision, or the Hub is unreachable.
        UnsafeCheckpointError: the revision has only pickled weights.
    """
    assert ref.repo is not None and ref.revision is not None
    if _COMMIT.match(ref.revision):
        return _pinned_listing(ref.repo, ref.revision, token)
    return _listing(ref.repo, ref.revision, token)


@functools.lru_cache(maxsize=256)
def _pinned_listing(repo: str, commit: str, token: str | None) -> HubListing:
    return _listing(repo, commit, token)


def _listing(repo: str, revision: str, token: str | None) -> HubListing:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf:{repo}@{revision}"
    try:
        info: Any = HfApi(token=token).model_info(repo, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        what = exc.__class__.__name__
        raise ModelNotFoundError(f"{where}: not found on the Hub ({what})") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(f"{where}: the Hub could not be reached ({exc})") from exc
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    refuse_pickle_only(list(sizes), where)
    return HubListing(repo=repo, commit=str(info.sha), sizes=sizes)


def missing_bytes(listing: HubListing, cache: Path, patterns: Sequence[str] = HUB_PATTERNS) -> int:
    """Bytes a download of ``listing`` with ``patterns`` still has to write into the Hub
    cache ``cache``: the files not there yet at this commit with their listed size."""
    from huggingface_hub import try_to_load_from_cache

    total = 0
    for name, size in listing.fetched(patterns).items():
        got = try_to_load_from_cache(listing.repo, name, cache_dir=cache, revision=listing.commit)
        if not (isinstance(got, str) and os.path.getsize(got) == size):
            total += size
    return total


def download(listing: HubListing, cache: Path, token: str | None, patterns: Sequence[str]) -> Path:
    """The snapshot directory of ``listing``'s commit with the files of ``patterns``."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            listing.repo,
            revision=listing.commit,  # pinned: the files cannot move under us mid-merge
            allow_patterns=list(patterns),
            cache_dir=cache,
            token=token,
        )
    )


def fetch_small(
    listing: HubListing, cache: Path, token: str | None, trusted_code: Collection[str]
) -> Path:
    """Download the configs and tokenizer files (and code, to hash it, never run it);
    refuse a model whose code is not allowed. The snapshot directory, without weights.

    Raises:
        RemoteCodeError: the model ships code not allowed.
    """
    code = [f"*{CODE_SUFFIX}"] if any(n.endswith(CODE_SUFFIX) for n in listing.sizes) else []
    check_remote_code(download(listing, cache, token, ["*.json", *code]), listing.ref, trusted_code)
    return download(listing, cache, token, SMALL_PATTERNS)


def header_checkpoint(snapshot: Path, listing: HubListing, read: RangeReader) -> Checkpoint:
    """The checkpoint of ``listing`` from its small files in ``snapshot`` and the headers
    of its weight files read through ``read`` (no weights downloaded: it serves
    preflights and size estimates, no tensor data can be read from it).

    Raises:
        ModelNotFoundError: a weight file the index names is not in the listing.
        CorruptCheckpointError: a header is malformed or points past its file's size.
    """
    headers = []
    for name in listing.weights(snapshot):
        if name not in listing.sizes:
            raise ModelNotFoundError(f"{listing.ref}: {INDEX_NAME} lists {name}, not in the repo")
        size = listing.sizes[name]
        found, _ = header_of(snapshot / name, size, functools.partial(read, name))
        headers.append((snapshot / name, found))
    return Checkpoint.from_headers(snapshot, read_config(snapshot), headers)


def hub_reader(listing: HubListing, token: str | None) -> RangeReader:
    """Byte ranges of the files of ``listing``'s commit, read over HTTP from the Hub."""
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils._headers import build_hf_headers

    headers = build_hf_headers(token=token)

    def read(name: str, offset: int, length: int) -> bytes:
        url = hf_hub_url(listing.repo, name, revision=listing.commit)
        span = {"range": f"bytes={offset}-{offset + max(length, 1) - 1}"}
        try:
            response = get_session().get(url, headers={**headers, **span}, timeout=30)
            hf_raise_for_status(response)
        except Exception as exc:  # HTTP errors of the Hub client, network errors
            raise ModelNotFoundError(
                f"{listing.ref}: cannot read the header of {name} from the Hub ({exc})"
            ) from exc
        return bytes(response.content[:length])

    return read


def inspect_hub(
    ref: ModelRef, cache: Path, token: str | None, trusted_code: Collection[str]
) -> Checkpoint:
    """``ref`` as a checkpoint to preflight: the cached snapshot when its weights are all
    there, else the small files and the weights' headers (no weights downloaded)."""
    listing = list_hub(ref, token)
    snapshot = fetch_small(listing, cache, token, trusted_code)
    if missing_bytes(listing, cache) == 0:
        return Checkpoint.open(snapshot)
    return header_checkpoint(snapshot, listing, hub_reader(listing, token))


def resolve_hub(
    ref: ModelRef, cache: Path, token: str | None, trusted_code: Collection[str]
) -> tuple[str, Path, str]:
    """Download ``ref`` pinned to its commit, after checking the cache's file system can
    take what is missing (+10 %): (pinned ref, snapshot directory, commit).

    Raises:
        ModelNotFoundError, UnsafeCheckpointError, RemoteCodeError,
        InsufficientStorageError (nothing of the weights downloaded).
    """
    listing = list_hub(ref, token)
    fetch_small(listing, cache, token, trusted_code)  # refuse code before any weight
    ensure_space([(cache, missing_bytes(listing, cache))])
    return listing.ref, download(listing, cache, token, HUB_PATTERNS), listing.commit
