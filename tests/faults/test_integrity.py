"""Integrity on every read: one flipped byte in a stored residual pack or merged model
never reaches a published model. The entry is quarantined (kept aside), rebuilt from
its sources when they exist (same bytes as an undisturbed run), and otherwise the
read fails with the message `realign verify` gives."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import ArtifactCorruptError
from app.demo.tiny import TinyTriple
from app.merge import compute, merge_to_store, remove, verify
from app.residuals.inline import stream_merged
from app.store.local import LocalStore
from tests.helpers import copy_model

ROOT = Path(__file__).resolve().parents[2]


def realign(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def flip_byte(file: Path) -> None:
    """Flip one bit of one byte in the middle of a safetensors file's tensor data (of a
    frames file: in its middle)."""
    data = bytearray(file.read_bytes())
    start = 0 if file.suffix == ".frames" else 8 + int.from_bytes(data[:8], "little")
    at = start + (len(data) - start) // 2
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def weights(model: Path) -> dict[str, bytes]:
    """The files that carry a model's values (manifests hold a creation time)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(model.iterdir())
        if p.suffix in (".safetensors", ".frames") or p.name == "config.json"
    }


def pack_shards(store: Path, key: str) -> list[Path]:
    return pack_files(store / "residuals" / key)


def pack_files(pack: Path) -> list[Path]:
    """A pack's weight files: frames of an exact pack, safetensors shards of the others."""
    return sorted(p for p in pack.glob("residual*") if p.suffix in (".safetensors", ".frames"))


def quarantined(store: Path) -> list[str]:
    return sorted(p.name for p in (store / ".quarantine").iterdir() if p.is_dir())


def one_line(text: str) -> str:
    return " ".join(text.split())


def no_path(message: str) -> str:
    return re.sub(r"moved aside to \S+;", "moved aside to Q;", one_line(message))


@pytest.fixture
def triple_copy(llama_triple: TinyTriple, tmp_path: Path) -> TinyTriple:
    """Copies of the triple that a test may delete (to take the sources away)."""
    root = tmp_path / "models"
    return TinyTriple(
        base=copy_model(llama_triple.base, root / "base"),
        instruct=copy_model(llama_triple.instruct, root / "instruct"),
        new_base=copy_model(llama_triple.new_base, root / "new_base"),
    )


def test_cli_apply_rebuilds_a_corrupt_pack(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    clean, store = tmp_path / "clean", tmp_path / "store"
    ref = realign(
        "merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base),
        "-o", str(tmp_path / "ref"), "--store", str(clean),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    key = compute(str(t.base), str(t.instruct), store=store).key
    original = [p.read_bytes() for p in pack_shards(store, key)]
    flip_byte(pack_shards(store, key)[-1])

    res = realign(
        "apply", "-r", key[:10], "-t", str(t.new_base), "-o", str(tmp_path / "out"),
        "--store", str(store),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "rebuilt" in res.stdout + res.stderr  # the notice reaches the user (log)
    assert weights(tmp_path / "out") == weights(tmp_path / "ref")
    assert [p.read_bytes() for p in pack_shards(store, key)] == original
    assert len(quarantined(store)) == 1 and quarantined(store)[0].startswith(key)
    assert LocalStore(store).quarantine_count() == 1
    verify(key, store=store)  # the rebuilt pack is whole


def test_cli_apply_without_sources_fails_like_verify(
    triple_copy: TinyTriple, tmp_path: Path
) -> None:
    t = triple_copy
    store = tmp_path / "store"
    key = compute(str(t.base), str(t.instruct), store=store).key
    victim = pack_shards(store, key)[0]
    flip_byte(victim)
    twin = tmp_path / "twin"
    shutil.copytree(store, twin)
    shutil.rmtree(t.base)  # the sources are gone
    shutil.rmtree(t.instruct)

    said = realign("verify", key, "--store", str(twin))
    res = realign(
        "apply", "-r", key, "-t", str(t.new_base), "-o", str(tmp_path / "out"),
        "--store", str(store),
    )  # fmt: skip
    assert res.returncode == 1 and said.returncode == 1
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no staging left beside it either
    message = no_path(res.stderr)
    assert message == no_path(said.stderr)
    assert f"{victim.name} does not match its recorded checksum" in message
    assert f"realign compute --base {t.base} --instruct {t.instruct}" in message
    assert quarantined(store) and not (store / "residuals" / key).exists()
    assert "ok" not in realign("ls", "--store", str(store)).stdout


def test_cli_merge_reusing_a_corrupt_pack(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    store = tmp_path / "store"
    args = ("merge", "-b", str(t.base), "-i", str(t.instruct), "-t", str(t.new_base))
    first = realign(*args, "-o", str(tmp_path / "first"), "--store", str(store))
    assert first.returncode == 0, first.stderr
    (key,) = (p.name for p in (store / "residuals").iterdir())
    flip_byte(pack_shards(store, key)[0])

    again = realign(*args, "-o", str(tmp_path / "again"), "--store", str(store))
    assert again.returncode == 0, again.stderr
    assert "reused" in again.stderr and "rebuilt" in again.stdout + again.stderr
    assert weights(tmp_path / "again") == weights(tmp_path / "first")
    assert len(quarantined(store)) == 1


def test_merge_to_store_rebuilds_a_corrupt_pack_with_a_notice(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store, clean = tmp_path / "store", tmp_path / "clean"
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    ref = merge_to_store(**req, alpha=0.5, store=clean)
    merge_to_store(**req, store=store)  # residual and first merged model, one pass
    key = ref.residual_key
    flip_byte(pack_shards(store, key)[-1])

    notices: list[str] = []
    done = merge_to_store(**req, alpha=0.5, store=store, notice=notices.append)
    assert done.created and done.key == ref.key
    assert weights(done.path) == weights(ref.path)
    assert len(notices) == 1 and "rebuilt" in notices[0] and key in notices[0]
    assert LocalStore(store).quarantine_count() == 1
    verify(key, store=store)


def test_merge_to_store_with_a_residual_key_and_no_sources_publishes_nothing(
    triple_copy: TinyTriple, tmp_path: Path
) -> None:
    t = triple_copy
    store = tmp_path / "store"
    key = compute(str(t.base), str(t.instruct), store=store).key
    flip_byte(pack_shards(store, key)[0])
    shutil.rmtree(t.instruct)
    with pytest.raises(ArtifactCorruptError, match="does not match its recorded checksum"):
        merge_to_store(residual=key, target=str(t.new_base), store=store)
    assert list((store / "merged").iterdir()) == []
    assert [p.name for p in (store / ".staging").iterdir()] == []
    assert LocalStore(store).quarantine_count() == 1


def test_reused_merged_model_is_verified(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    store = tmp_path / "store"
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    first = merge_to_store(**req, store=store)
    good = weights(first.path)
    flip_byte(sorted(first.path.glob("model*.safetensors"))[0])

    notices: list[str] = []
    again = merge_to_store(**req, store=store, notice=notices.append)
    assert again.key == first.key and again.created
    assert weights(again.path) == good
    assert len(notices) == 1 and "merged model" in notices[0]
    assert quarantined(store)[0].startswith(first.key)


def test_rm_and_recompute_never_hand_out_a_wrong_merged_model(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """The reported sequence: a corrupt pack, a job, `realign rm`, a recompute, the
    same job again — every model handed out has the undisturbed bytes."""
    t = llama_triple
    store, clean = tmp_path / "store", tmp_path / "clean"
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    good = weights(merge_to_store(**req, alpha=0.5, store=clean).path)
    key = compute(str(t.base), str(t.instruct), store=store).key
    flip_byte(pack_shards(store, key)[0])

    assert weights(merge_to_store(**req, alpha=0.5, store=store).path) == good
    remove(key, store=store)
    assert list((store / "merged").iterdir()) == []  # nothing made from it stays
    compute(str(t.base), str(t.instruct), store=store)
    assert weights(merge_to_store(**req, alpha=0.5, store=store).path) == good


def test_pack_directory_outside_the_store_is_checked(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    from app.merge import apply

    t = llama_triple
    res = compute(str(t.base), str(t.instruct), store=tmp_path / "store")
    pack = shutil.copytree(res.path, tmp_path / "pack")
    flip_byte(pack_files(pack)[0])
    with pytest.raises(ArtifactCorruptError, match="does not match its recorded checksum"):
        apply(str(pack), str(t.new_base), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_file_records_a_fast_checksum_and_older_packs_still_verify(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """New artifacts record an XXH3-128 of each file and are checked by it on read; a
    pack written before (sha256 only, resealed) is checked by sha256."""
    from app.merge import apply
    from app.residuals.integrity import xxh3_hex
    from app.residuals.manifest import ResidualManifest, read_merge_manifest, write_json

    t = llama_triple
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    stored = merge_to_store(**req, alpha=0.5, store=tmp_path / "store").path
    res = compute(str(t.base), str(t.instruct), store=tmp_path / "store")
    merged = read_merge_manifest(stored)
    for directory, files in [
        (res.path, res.manifest.files),
        (stored, {**merged.files, **merged.other_files}),
    ]:
        assert files
        for name, entry in files.items():
            assert entry.xxh3_128 == xxh3_hex((directory / name).read_bytes()), name
            assert (entry.sha256 is None) == name.endswith(".frames"), name
    old = shutil.copytree(res.path, tmp_path / "old")
    manifest = res.manifest.model_copy(
        update={
            "files": {
                n: e.model_copy(
                    update={
                        "xxh3_128": None,
                        "sha256": hashlib.sha256((res.path / n).read_bytes()).hexdigest(),
                    }
                )
                for n, e in res.manifest.files.items()
            }
        }
    )
    write_json(old / "manifest.json", ResidualManifest.model_validate(manifest.model_dump()))
    out = apply(res.key, str(t.new_base), tmp_path / "out", store=tmp_path / "store").out
    first = apply(str(old), str(t.new_base), tmp_path / "again").out
    assert weights(first) == weights(out)
    flip_byte(pack_files(old)[0])
    with pytest.raises(ArtifactCorruptError, match="does not match its recorded checksum"):
        apply(str(old), str(t.new_base), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_in_engine_merge_refuses_a_corrupt_pack(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    res = compute(str(t.base), str(t.instruct), store=tmp_path / "store")
    assert len(list(stream_merged(res.path, t.new_base))) > 0  # whole: streams through
    flip_byte(pack_shards(tmp_path / "store", res.key)[0])
    with pytest.raises(ArtifactCorruptError):
        for _ in stream_merged(res.path, t.new_base):
            pass


def test_api_job_on_a_corrupt_pack_succeeds_with_an_event_and_a_metric(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from app.api.app import create_app
    from app.core.settings import Settings
    from tests.api.live import LiveServer, merge_body, wait_for

    t = llama_triple
    store, clean = tmp_path / "store", tmp_path / "clean"
    good = weights(merge_to_store(base=str(t.base), instruct=str(t.instruct),
                                  target=str(t.new_base), alpha=0.5, store=clean).path)  # fmt: skip
    key = compute(str(t.base), str(t.instruct), store=store).key
    flip_byte(pack_shards(store, key)[0])
    app = create_app(Settings(models_cache_dir=store, allowed_roots=[t.base.parent]))
    with LiveServer(app) as server, server.client() as client:
        job = client.post("/v1/merges", json=merge_body(t, alpha=0.5)).json()
        done = wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        events = client.get(f"/v1/merges/{job['id']}/events").json()
        metrics = client.get("/metrics").text
    said = [e["message"] for e in events if "rebuilt" in (e.get("message") or "")]
    assert len(said) == 1 and key in said[0]
    (merged,) = (store / "merged").iterdir()
    assert weights(merged) == good
    counts = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert counts["realign_store_quarantined_total"] == 1


def test_reused_merged_model_config_is_verified(llama_triple: TinyTriple, tmp_path: Path) -> None:
    t = llama_triple
    store = tmp_path / "store"
    req = {"base": str(t.base), "instruct": str(t.instruct), "target": str(t.new_base)}
    first = merge_to_store(**req, store=store)
    config = (first.path / "config.json").read_text()
    assert '"silu"' in config
    (first.path / "config.json").write_text(config.replace('"silu"', '"gelu"'))  # same size

    notices: list[str] = []
    again = merge_to_store(**req, store=store, notice=notices.append)
    assert again.created and (again.path / "config.json").read_text() == config
    assert len(notices) == 1 and "config.json" in notices[0]


def flip_digit(manifest: Path, field: str) -> None:
    """Change one digit of ``"field": <number>`` in a manifest: still valid JSON, still a
    valid manifest, another value (the kind of change only a seal notices)."""
    text = manifest.read_text()
    at = text.index(f'"{field}": ') + len(f'"{field}": ')
    digit = text[at]
    assert digit.isdigit()
    manifest.write_text(text[:at] + str((int(digit) + 1) % 10) + text[at + 1 :])


def test_a_changed_manifest_is_noticed_and_rebuilt(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """One digit of the pack's manifest (a special token id, which would end up in the
    merged config) changes: verify says so, apply quarantines and rebuilds the pack, the
    merged model equals an undisturbed one."""
    t = llama_triple
    store, clean = tmp_path / "store", tmp_path / "clean"
    key = compute(str(t.base), str(t.instruct), store=store).key
    compute(str(t.base), str(t.instruct), store=clean)
    manifest = store / "residuals" / key / "manifest.json"
    original = manifest.read_bytes()
    flip_digit(manifest, "bos_token_id")
    twin = tmp_path / "twin"
    shutil.copytree(store, twin)
    res = realign("verify", key, "--store", str(twin))
    assert res.returncode == 1 and "manifest.json does not match" in one_line(res.stderr)

    res = realign(
        "apply", "-r", key, "-t", str(t.new_base), "-o", str(tmp_path / "out"),
        "--store", str(store),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ref = realign(
        "apply", "-r", key, "-t", str(t.new_base), "-o", str(tmp_path / "ref"),
        "--store", str(clean),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    assert weights(tmp_path / "out") == weights(tmp_path / "ref")
    assert len(quarantined(store)) == 1 and manifest.read_bytes() != original  # new seal
    verify(key, store=store)


@pytest.mark.parametrize("damage", ["not_json", "no_seal"])
def test_an_unreadable_manifest_does_not_block_its_key(
    llama_triple: TinyTriple, tmp_path: Path, damage: str
) -> None:
    """A manifest that is no JSON (or lost its seal) is corruption like any other: the
    next compute of the pair quarantines and rebuilds it instead of failing for good."""
    t = llama_triple
    store = tmp_path / "store"
    first = compute(str(t.base), str(t.instruct), store=store)
    manifest = first.path / "manifest.json"
    if damage == "not_json":
        manifest.write_bytes(b"\x00" + manifest.read_bytes()[1:])
    else:
        data = json.loads(manifest.read_text())
        data.pop("manifest_sha256")
        manifest.write_text(json.dumps(data))
    twin = tmp_path / "twin"
    shutil.copytree(store, twin)
    with pytest.raises(ArtifactCorruptError, match=r"manifest\.json"):
        verify(first.key, store=twin)
    notices: list[str] = []
    again = compute(str(t.base), str(t.instruct), store=store, notice=notices.append)
    assert again.key == first.key and not again.created
    assert len(notices) == 1 and "rebuilt" in notices[0]
    assert len(quarantined(store)) == 1
    verify(first.key, store=store)


def test_compute_never_hands_out_the_key_of_a_corrupt_pack(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    store = tmp_path / "store"
    first = compute(str(t.base), str(t.instruct), store=store)
    original = [p.read_bytes() for p in pack_shards(store, first.key)]
    flip_byte(pack_shards(store, first.key)[0])
    again = compute(str(t.base), str(t.instruct), store=store)
    assert again.key == first.key
    assert [p.read_bytes() for p in pack_shards(store, first.key)] == original
    assert len(quarantined(store)) == 1


def test_serving_refuses_a_merged_model_changed_after_publication(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    """The engine pool checks a merged model against its manifest before loading it."""
    import asyncio

    from app.engines.pool import EnginePool, ModelSource

    t = llama_triple
    done = merge_to_store(
        base=str(t.base), instruct=str(t.instruct), target=str(t.new_base), store=tmp_path / "s"
    )
    flip_byte(sorted(done.path.glob("model*.safetensors"))[0])
    started: list[Path] = []

    def factory(path: Path) -> object:  # never reached: the check comes first
        started.append(path)
        raise AssertionError("an engine was started on a corrupt model")

    async def load() -> None:
        pool = EnginePool(factory)  # type: ignore[arg-type]
        await pool.load(ModelSource.at("m", done.path))

    with pytest.raises(Exception, match="does not match its recorded checksum"):
        asyncio.run(load())
    assert started == []
