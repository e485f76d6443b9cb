"""A node's cached copy of an artifact the bucket no longer lists is never published
again: a build of that key drops the copy (quarantined when it no longer matches its
manifest) and builds from the sources. Real S3 API server, real files, real flips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.errors import ArtifactCorruptError
from app.demo.tiny import TinyTriple
from app.merge import compute, merge_to_store, remove
from app.store.objects import ObjectStore
from app.store.remote import COMMIT
from tests.s3server import S3Server, object_store


def _marker(s3_server: S3Server, bucket: str, key: str) -> dict[str, object]:
    name = f"realign/residuals/{key}/{COMMIT}"
    body = s3_server.client().get_object(Bucket=bucket, Key=name)["Body"].read()
    return dict(json.loads(body))


def _cached_on(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> tuple[ObjectStore, ObjectStore, str]:
    """Node A publishes the residual; node B downloads it into its cache."""
    t = llama_triple
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = compute(str(t.base), str(t.instruct), store=node_a).key
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    with node_b.using(key):
        pass
    assert node_b.cache.exists(key)
    return node_a, node_b, key


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _flip(path: Path) -> None:
    shard = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".frames"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # tensor bytes, past the header (of a frames file: its last frame)
    shard.write_bytes(bytes(data))


def test_a_removed_artifact_is_built_again_not_put_back(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """`realign rm` on node A; node B, whose cache still holds the pack, asked for it
    again, builds it from the sources: the removed copy is not committed back."""
    t = llama_triple
    node_a, node_b, key = _cached_on(llama_triple, s3_server, bucket, tmp_path)
    first = _marker(s3_server, bucket, key)
    assert remove(key, store=node_a) == key
    assert not node_b.exists(key) and node_b.cache.exists(key)
    again = compute(str(t.base), str(t.instruct), store=node_b)
    assert again.created  # built from the sources, not put back from the cache
    assert _marker(s3_server, bucket, key)["data"] != first["data"]
    assert node_b.verify(key).key == key
    assert node_b.quarantine_count() == 0  # an intact copy is dropped, not quarantined


def test_a_damaged_cached_copy_is_quarantined_not_published(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The bucket lost the entry (a lifecycle rule: objects deleted outside Realign) and
    node B's cached copy rotted: B quarantines it and publishes a fresh build, which
    another node downloads and verifies."""
    t = llama_triple
    _, node_b, key = _cached_on(llama_triple, s3_server, bucket, tmp_path)
    first = _marker(s3_server, bucket, key)
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"realign/residuals/{key}/")
    client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listed["Contents"]]}
    )
    _flip(node_b.cache.path(key))
    with pytest.raises(ArtifactCorruptError):
        node_b.cache.verify(key)
    again = compute(str(t.base), str(t.instruct), store=node_b)
    assert again.created and node_b.quarantine_count() == 1
    files = _marker(s3_server, bucket, key)["files"]
    assert isinstance(files, dict) and isinstance(first["files"], dict)
    del files["manifest.json"], first["files"]["manifest.json"]  # it records when it was made
    assert files == first["files"]  # the bytes the sources give, not the damaged copy's
    node_c = object_store(s3_server, bucket, tmp_path / "c")
    assert node_c.verify(key).key == key


def test_a_copy_a_reader_holds_stays_and_the_rebuild_goes_to_the_bucket(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A reader on node B holds the removed pack while B builds it again: the reader's
    copy stays where it is, the bucket gets the rebuild."""
    t = llama_triple
    node_a, node_b, key = _cached_on(llama_triple, s3_server, bucket, tmp_path)
    remove(key, store=node_a)
    with node_b.cache.using(key) as held:
        before = _files(held)
        again = compute(str(t.base), str(t.instruct), store=node_b)
        assert again.created and node_b.exists(key)
        assert _files(held) == before
    node_c = object_store(s3_server, bucket, tmp_path / "c")
    assert node_c.verify(key).key == key


def test_a_merged_model_removed_and_damaged_in_a_cache_is_built_again(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The same for a merged model: removed from the bucket, its copy in node B's cache
    damaged; B's merge quarantines the copy and publishes a new build. The damaged bytes
    never reach the bucket (nothing there had to be quarantined)."""
    t = llama_triple
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    node_a = object_store(s3_server, bucket, tmp_path / "a")
    key = merge_to_store(**req, store=node_a).key
    node_b = object_store(s3_server, bucket, tmp_path / "b")
    with node_b.using(key, "merged") as path:
        _flip(path)
    node_a.remove(key, "merged")
    again = merge_to_store(**req, store=node_b)
    assert again.key == key and again.created and node_b.quarantine_count() == 1
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="realign/.quarantine/")
    assert listed.get("KeyCount", 0) == 0
    assert object_store(s3_server, bucket, tmp_path / "c").verify_merged(key).files
