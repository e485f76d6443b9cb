"""Hub models are preflighted from their configs and safetensors headers alone, and their
download is sized before it starts.

No test reaches the Hub: a real model directory is served through the same code path
a Hub model takes — its real file listing with sizes (what ``model_info`` lists) and
byte ranges of its real files (what the ranged header reads return). The merges by
method (ties, dare, several residuals) go further: the real Hub client talks to a
Hub-compatible HTTP server on loopback (tests/hubserver.py), so ``list_hub``,
``hub_reader`` and ``snapshot_download`` run too, against the server's API, not the
Hub's own.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import CorruptCheckpointError, InsufficientStorageError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple
from app.merge import ResidualInput, compute, merge_to_store, preflight
from app.residuals.apply import plan_fused
from app.residuals.checkpoint import Checkpoint
from app.residuals.dtypes import BY_NAME
from app.residuals.hub import (
    SMALL_PATTERNS,
    HubListing,
    RangeReader,
    header_checkpoint,
    missing_bytes,
)
from app.residuals.lineage import measure
from app.residuals.refs import HUB_PATTERNS
from app.residuals.space import HEADROOM, merged_bytes, residual_bytes
from app.store.factory import store_from_settings
from app.store.inputs import check_download_room, hub_cache
from tests.hubserver import HubServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BF16 = BY_NAME["bfloat16"]


def served(model: Path, repo: str = "org/tiny") -> tuple[HubListing, RangeReader]:
    """``model`` as the Hub would list it at COMMIT, and its files read by ranges."""
    sizes = {p.name: p.stat().st_size for p in model.iterdir()}

    def read(name: str, offset: int, length: int) -> bytes:
        with (model / name).open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    return HubListing(repo=repo, commit=COMMIT, sizes=sizes), read


def snapshot(model: Path, listing: HubListing, into: Path) -> Path:
    """What validation downloads of a Hub model: the files of SMALL_PATTERNS only."""
    into.mkdir(parents=True)
    for name in listing.fetched(SMALL_PATTERNS):
        shutil.copy2(model / name, into / name)
    return into


def headers_only(model: Path, into: Path) -> Checkpoint:
    listing, read = served(model)
    return header_checkpoint(snapshot(model, listing, into), listing, read)


def _table(ckpt: Checkpoint) -> dict[str, tuple[object, ...]]:
    return {
        n: (t.dtype.name, t.shape, t.nbytes, t.offset, t.file.name) for n, t in ckpt.tensors.items()
    }


def test_validation_downloads_no_weights(llama_triple: TinyTriple) -> None:
    listing, _ = served(llama_triple.new_base)
    small = listing.fetched(SMALL_PATTERNS)
    assert small and not any(n.endswith(".safetensors") for n in small)
    assert "tokenizer.json" in small and "model.safetensors.index.json" in small
    weights = {n for n in listing.fetched(HUB_PATTERNS) if n.endswith(".safetensors")}
    assert weights == {n for n in listing.sizes if n.endswith(".safetensors")}


def test_header_checkpoint_is_the_downloaded_model_without_its_weights(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """Tensors, config, the preflight's plan and the output estimates are the same from
    the headers as from the full download; tensor data cannot be read from it."""
    sides = {s: getattr(llama_triple, s) for s in ("instruct", "base", "new_base")}
    heads = {s: headers_only(m, tmp_path / s) for s, m in sides.items()}
    fulls = {s: Checkpoint.open(m) for s, m in sides.items()}
    for side in sides:
        assert _table(heads[side]) == _table(fulls[side])
        assert heads[side].config == fulls[side].config
    i, b, t = heads.values()
    fi, fb, ft = fulls.values()
    jobs, vocab = plan_fused(i, b, t, 0.5)
    full_jobs, full_vocab = plan_fused(fi, fb, ft, 0.5)
    assert [j.spec for j in jobs] == [j.spec for j in full_jobs] and vocab == full_vocab
    assert residual_bytes(i, BF16) == residual_bytes(fi, BF16) > 0
    assert merged_bytes(t, i, i.path) == merged_bytes(ft, fi, fi.path) > 0
    info = next(iter(t.tensors.values()))
    with t, pytest.raises(FileNotFoundError):  # never zeros from a file not there
        t.read_into(info, 0, 1, memoryview(bytearray(info.row_bytes)))


def test_a_remote_header_past_its_listed_size_is_corrupt(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    listing, read = served(llama_triple.instruct)
    shard = "model-00002-of-00002.safetensors"
    short = HubListing(
        repo=listing.repo, commit=COMMIT, sizes={**listing.sizes, shard: listing.sizes[shard] // 2}
    )
    snap = snapshot(llama_triple.instruct, listing, tmp_path / "snap")
    with pytest.raises(CorruptCheckpointError, match=shard):
        header_checkpoint(snap, short, read)


def _cache_file(cache: Path, listing: HubListing, name: str, data: bytes) -> None:
    """A file as the Hub client leaves it in its cache (the snapshot of the commit)."""
    org, repo = listing.repo.split("/")
    snap = cache / f"models--{org}--{repo}" / "snapshots" / listing.commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / name).write_bytes(data)


def test_missing_bytes_counts_what_the_cache_lacks(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    model = llama_triple.instruct
    listing, _ = served(model)
    cache = tmp_path / "sources"
    everything = sum(listing.fetched(HUB_PATTERNS).values())
    assert everything == sum(p.stat().st_size for p in model.iterdir())
    assert missing_bytes(listing, cache) == everything
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    small = sum(listing.fetched(SMALL_PATTERNS).values())
    for name in listing.fetched(SMALL_PATTERNS):  # what validation downloaded
        _cache_file(cache, listing, name, (model / name).read_bytes())
    assert missing_bytes(listing, cache) == everything - small
    _cache_file(cache, listing, one, (model / one).read_bytes())
    _cache_file(cache, listing, two, (model / two).read_bytes()[:1000])  # interrupted
    assert missing_bytes(listing, cache) == listing.sizes[two]
    _cache_file(cache, listing, two, (model / two).read_bytes())
    assert missing_bytes(listing, cache) == 0


# -- the check before the download, on a real small disk --------------------------------
def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed (needs root): {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs: room for a tiny model's download, or its merged model, not both."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    _mount("-t", "tmpfs", "-o", "size=4M", "tmpfs", str(path))
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_download_and_output_are_checked_together(
    llama_triple: TinyTriple, tmpfs: Path, tmp_path: Path
) -> None:
    """A Hub target not downloaded yet, merged with a stored residual, into a store on a
    4 MB disk: the download fits alone, so would the merged model, not both (+10 %).
    The check refuses before anything is written, naming both places and the bytes."""
    store = store_from_settings(Settings(models_cache_dir=tmpfs))
    listing, _ = served(llama_triple.new_base)
    target = headers_only(llama_triple.new_base, tmp_path / "snap")
    download = missing_bytes(listing, hub_cache(store))
    outputs = merged_bytes(target, target, target.path)
    free = shutil.disk_usage(tmpfs).free
    assert download * HEADROOM < free and outputs * HEADROOM < free
    with pytest.raises(InsufficientStorageError) as caught:
        check_download_room(store, download, [(store.root, outputs)])
    assert caught.value.needed == math.ceil((download + outputs) * HEADROOM)
    message = str(caught.value)
    assert str(hub_cache(store)) in message and str(tmpfs) in message
    assert [p for p in hub_cache(store).rglob("*") if p.is_file()] == []  # nothing written
    check_download_room(store, download, [])  # the download alone would pass


# -- ties, dare and several residuals: through the Hub client, against a Hub server -----
# The Hub is tests/hubserver.py: the real client (listing, snapshot download, ranged
# reads) against a real HTTP server that serves the tiny models as Hub repositories.
def _weights_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if "residuals" not in p.parts)


def test_method_and_multi_preflight_read_headers_only(
    llama_triple: TinyTriple, hub: HubServer, store_dir: Path
) -> None:
    """The preflight of a ties merge of Hub models, and of several residuals (a stored
    pack and a Hub pair), downloads no weights: headers are read by ranges."""
    t = llama_triple
    settings = Settings(models_cache_dir=store_dir)
    b, i, tgt = (hub.add(m, m.name) for m in (t.base, t.instruct, t.new_base))
    info = preflight(target=tgt, base=b, instruct=i, method="ties", store=store_dir,
                     settings=settings)  # fmt: skip
    assert hub.downloads() == [] and _weights_in(store_dir) == []
    assert info is not None and info.distances == {} and "not downloaded yet" in info.skipped[0]
    key = compute(str(t.base), str(t.instruct), store=store_dir, settings=settings).key
    several = [ResidualInput(key=key), ResidualInput(base=b, instruct=i, weight=0.5)]
    info = preflight(target=tgt, residuals=several, store=store_dir, settings=settings)
    assert info is not None and [s.split(" ")[0] for s in info.skipped] == [
        "residuals[0]",
        "residuals[1]",
    ]
    assert hub.downloads() == [] and _weights_in(store_dir) == []
    model_bytes = sum(p.stat().st_size for p in t.new_base.glob("*.safetensors"))
    assert 0 < hub.weight_bytes() < model_bytes / 100  # headers only, for three models


def test_a_method_merge_downloads_a_hub_target_after_the_space_check(
    llama_triple: TinyTriple, hub: HubServer, tmpfs: Path, tmp_path: Path
) -> None:
    """A ties merge of a stored pack into a Hub target, into a store on a 4 MB disk: the
    target's download fits alone, so would the merged model, not both. The merge refuses
    before a byte of the target's weights is downloaded."""
    t = llama_triple
    pack = compute(str(t.base), str(t.instruct), store=tmp_path / "packs", settings=Settings())
    target = hub.add(t.new_base, "target")
    with pytest.raises(InsufficientStorageError):
        merge_to_store(
            target=target, residuals=[ResidualInput(key=str(pack.path))], method="ties",
            store=tmpfs, settings=Settings(models_cache_dir=tmpfs),
        )  # fmt: skip
    assert hub.downloads(target) == [] and _weights_in(tmpfs) == []
    assert not (tmpfs / "merged").exists() or not any((tmpfs / "merged").iterdir())


def test_a_method_merge_of_hub_models_records_the_lineage_after_the_download(
    llama_triple: TinyTriple, hub: HubServer, store_dir: Path
) -> None:
    """A dare merge of three Hub models: each weight file is downloaded once, by the
    merge, and the target is measured against the base then (the figures of the same
    models read locally)."""
    t = llama_triple
    settings = Settings(models_cache_dir=store_dir)
    b, i, tgt = (hub.add(m, m.name) for m in (t.base, t.instruct, t.new_base))
    done = merge_to_store(base=b, instruct=i, target=tgt, method="dare", store=store_dir,
                          settings=settings)  # fmt: skip
    shards = sorted(p.name for p in t.base.glob("*.safetensors"))
    for ref in (b, i, tgt):
        assert sorted(hub.downloads(ref)) == shards, ref
    info = done.manifest.lineage
    assert info is not None and info.passed and info.skipped == []
    with Checkpoint.open(t.base) as base, Checkpoint.open(t.new_base) as target:
        local, _ = measure(base, {"target": target})
    assert info.distances["target-base"] == local["target-base"]
