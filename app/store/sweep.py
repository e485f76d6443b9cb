"""Removing what builders left in a bucket: uploads no commit marker names.

A builder that died, or lost the race for a key, or lost its lease and could not
clean up, leaves objects under ``<kind>/<key>/.build-<fence>-<id>/`` that no marker
names (or, from older versions, under ``.staging/``). Readers never see them; the
sweep deletes them once every object of such an upload is ``ttl_s`` old. Uploads of
a key quarantined within ``ttl_s`` are kept for inspection; so is everything a
marker names.
"""

from __future__ import annotations

from typing import get_args

from app.store.base import Kind
from app.store.remote import BUILD, QUARANTINE, STAGING, Bucket, Scanned, ts
from app.store.s3 import list_objects


def sweep(bucket: Bucket, now: float, ttl_s: float) -> int:
    """Delete uncommitted uploads older than ``ttl_s``; how many objects went."""
    old = [
        o["Key"]
        for o in list_objects(bucket.cfg, bucket.bucket, bucket.name(STAGING) + "/")
        if ts(o["LastModified"]) + ttl_s < now
    ]
    spared = _quarantined(bucket, now - ttl_s)
    for kind in get_args(Kind):
        for key, entry in bucket.scan(kind).items():
            if (kind, key) not in spared:
                old += _orphans(bucket, kind, key, entry, now - ttl_s)
    bucket.delete_names(old)
    return len(old)


def _orphans(bucket: Bucket, kind: Kind, key: str, entry: Scanned, before: float) -> list[str]:
    """Objects of ``key``'s uploads that no marker names, all written before ``before``."""
    builds = {g: objs for g, objs in entry.groups.items() if g.startswith(BUILD)}
    if not builds:
        return []
    committed = ""
    if entry.marker is not None:
        if len(entry.groups) == 1:
            return []  # the one upload is the committed one
        done = bucket.committed(key, kind)
        if done is None:  # removed since the listing: the next sweep sees it
            return []
        committed = done.data
    return [
        o["Key"]
        for group, objs in builds.items()
        if group != committed and all(ts(o["LastModified"]) < before for o in objs)
        for o in objs
    ]


def _quarantined(bucket: Bucket, since: float) -> set[tuple[str, str]]:
    """(kind, key) of the artifacts quarantined after ``since``."""
    base = bucket.name(QUARANTINE) + "/"
    out = set()
    for obj in list_objects(bucket.cfg, bucket.bucket, base):
        kind, _, note = obj["Key"][len(base) :].partition("/")
        if ts(obj["LastModified"]) >= since:
            out.add((kind, note.partition(".")[0]))
    return out
