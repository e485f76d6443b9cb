"""A merge written shard by shard (each output file on its own, then assembled) gives
the files of the single-writer apply, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.core.errors import ArtifactCorruptError
from app.demo.tiny import TinyTriple
from app.merge import compute
from app.residuals.apply import apply_residual
from app.residuals.apply_shard import (
    ShardOutput,
    apply_shard,
    assemble_merged,
    plan_apply_shards,
)
from app.residuals.checkpoint import Checkpoint
from app.residuals.hashing import FileHasher
from app.residuals.sources import RunOptions, local_source
from tests.helpers import card_without_time

MAX_SHARD = int(0.0005 * 1024**3)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def _without_time(raw: bytes) -> dict[str, object]:
    manifest = json.loads(raw)
    manifest.pop("created_at")
    manifest.pop("manifest_sha256")  # seals the creation time too
    return manifest  # type: ignore[no-any-return]


def _split_apply(pack: Path, target: Path, out: Path, alpha: float, work: Path) -> None:
    """Every shard in a directory of its own (as separate workers would), then assembled."""
    with Checkpoint.open(target) as t:
        _, shards = plan_apply_shards(pack, t, alpha, MAX_SHARD)
        written: dict[int, ShardOutput] = {}
        for shard in reversed(shards):  # any order: each file stands alone
            tmp = work / f"w{shard.index}"
            tmp.mkdir()
            opts = RunOptions(max_shard_bytes=MAX_SHARD, hash_outputs=True)
            written[shard.index] = apply_shard(
                pack, t, tmp, alpha=alpha, index=shard.index, opts=opts
            )
            assert [p.name for p in tmp.iterdir()] == [shard.file]  # no index, nothing else
        out.mkdir()
        outputs = [written[s.index] for s in shards]
        for s in shards:
            shutil.move(work / f"w{s.index}" / s.file, out / s.file)
        src = local_source(target, FileHasher(work / "hashes.sqlite"))
        assemble_merged(
            out, pack, t, target_src=src, alpha=alpha, max_shard_bytes=MAX_SHARD, outputs=outputs
        )


@pytest.mark.parametrize(
    ("triple", "alpha"),
    [("llama_triple", 1.0), ("llama_triple_extra_vocab", 0.7), ("qwen_triple", 0.5)],
)
def test_shard_by_shard_equals_one_writer(
    triple: str, alpha: float, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    t: TinyTriple = request.getfixturevalue(triple)
    pack = compute(str(t.base), str(t.instruct), store=tmp_path / "store").path
    one = tmp_path / "one"
    one.mkdir()
    with Checkpoint.open(t.new_base) as target:
        src = local_source(t.new_base, FileHasher(tmp_path / "h.sqlite"))
        opts = RunOptions(max_shard_bytes=MAX_SHARD, hash_outputs=True)
        apply_residual(pack, target, one, target_src=src, alpha=alpha, opts=opts)
    split = tmp_path / "split"
    (tmp_path / "work").mkdir()
    _split_apply(pack, t.new_base, split, alpha, tmp_path / "work")

    a, b = _files(one), _files(split)
    assert len([n for n in a if n.endswith(".safetensors")]) >= 3  # really split
    assert a.keys() == b.keys()
    for name in a:
        if name == "realign.json":
            assert _without_time(a[name]) == _without_time(b[name])
        elif name == "README.md":  # the card prints the time to the minute
            assert card_without_time(a[name]) == card_without_time(b[name])
        else:
            assert a[name] == b[name], name


def test_a_corrupt_pack_file_fails_the_shard_that_reads_it(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    stored = compute(str(t.base), str(t.instruct), store=tmp_path / "store").path
    pack = shutil.copytree(stored, tmp_path / "pack")
    victim = sorted(pack.glob("*.frames"))[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with Checkpoint.open(t.new_base) as target:
        _, shards = plan_apply_shards(pack, target, 1.0, MAX_SHARD)
        failed = []
        for shard in shards:
            out = tmp_path / f"o{shard.index}"
            out.mkdir()
            opts = RunOptions(max_shard_bytes=MAX_SHARD)
            try:
                apply_shard(pack, target, out, alpha=1.0, index=shard.index, opts=opts)
            except ArtifactCorruptError as exc:
                assert exc.file == victim.name
                failed.append(shard.index)
    assert failed, "some shard reads the altered pack file and must refuse it"
