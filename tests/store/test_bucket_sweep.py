"""The bucket layout against a real S3 API server: uploads no marker names are swept a
day later (a quarantined artifact's files are kept a day after its quarantine),
sizes count only the committed upload, and entries from before per-builder prefixes
stay readable."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from app.store.remote import COMMIT, STAGING_TTL_S
from tests.s3server import S3Server, object_store

DAY = STAGING_TTL_S


def _names(s3: S3Server, bucket: str) -> set[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in listing}


def _fill(tmp: Path, tag: str) -> Path:
    tmp.mkdir(parents=True)
    for i in range(2):
        (tmp / f"part-{i}.bin").write_bytes(f"{tag} {i} ".encode() * 500)
    return tmp


def test_sweep_removes_only_uploads_no_marker_names(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    st = object_store(s3_server, bucket, tmp_path / "c")
    kept, sick = "a" * 32, "b" * 32
    st.publish(_fill(tmp_path / "kept", "kept"), kept)
    st.publish(_fill(tmp_path / "sick", "sick"), sick)
    size = sum(len(p.read_bytes()) for p in (tmp_path / "kept").iterdir())
    client = s3_server.client()
    dead = f"realign/residuals/{kept}/.build-7-deadbeef0000/part-0.bin"
    client.put_object(Bucket=bucket, Key=dead, Body=b"x" * 4096)  # a builder that died
    legacy = f"realign/.staging/{kept}.0ld/part-0.bin"
    client.put_object(Bucket=bucket, Key=legacy, Body=b"y")  # from before builder prefixes
    (part,) = (n for n in _names(s3_server, bucket) if f"/{sick}/" in n and "part-0" in n)
    damaged = bytearray(client.get_object(Bucket=bucket, Key=part)["Body"].read())
    damaged[0] ^= 0xFF  # the bucket's copy is bad: quarantine hides it there too
    client.put_object(Bucket=bucket, Key=part, Body=bytes(damaged))
    time.sleep(1.1)  # listings give whole seconds: the quarantine comes a second later
    st.quarantine(sick, "residuals", "a flipped byte")
    notes = client.list_objects_v2(Bucket=bucket, Prefix="realign/.quarantine/")["Contents"]
    quarantined = notes[0]["LastModified"].timestamp()
    sick_files = {n for n in _names(s3_server, bucket) if f"/{sick}/.build-" in n}
    assert len(sick_files) == 2

    assert [(a.key, a.size) for a in st.artifacts()] == [(kept, size)]  # not the dead upload
    assert st.bucket.sweep_staging() == 0  # nothing is a day old yet
    assert st.bucket.sweep_staging(now=quarantined + DAY) == 2
    left = _names(s3_server, bucket)
    assert dead not in left and legacy not in left
    assert sick_files <= left  # quarantined less than a day ago: kept for inspection
    assert f"realign/residuals/{kept}/{COMMIT}" in left
    assert st.bucket.sweep_staging(now=quarantined + DAY + 1) == 2
    assert not sick_files & _names(s3_server, bucket)
    reader = object_store(s3_server, bucket, tmp_path / "reader")
    with reader.using(kept) as path:
        assert {p.name for p in path.iterdir()} == {"part-0.bin", "part-1.bin"}


def test_entries_from_before_builder_prefixes_stay_readable(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A marker without ``data`` names files directly under the key."""
    key, client = "c" * 32, s3_server.client()
    src = _fill(tmp_path / "old", "old")
    files = {}
    for p in src.iterdir():
        body = p.read_bytes()
        client.put_object(Bucket=bucket, Key=f"realign/residuals/{key}/{p.name}", Body=body)
        files[p.name] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    marker = {"key": key, "kind": "residuals", "created": time.time(), "files": files}
    client.put_object(
        Bucket=bucket, Key=f"realign/residuals/{key}/{COMMIT}", Body=json.dumps(marker)
    )
    st = object_store(s3_server, bucket, tmp_path / "c")
    assert [a.key for a in st.artifacts()] == [key]
    assert st.bucket.sweep_staging(now=time.time() + 2 * DAY) == 0  # not an upload
    with st.using(key) as path:
        assert {p.name: p.read_bytes() for p in path.iterdir()} == {
            p.name: p.read_bytes() for p in src.iterdir()
        }
    st.remove(key)
    assert _names(s3_server, bucket) == set()
