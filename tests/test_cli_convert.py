"""`realign convert`: a stored residual pack made again in another format from the sources
its manifest records (a real subprocess, real stores, real safetensors models)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from app.demo.tiny import TinyTriple
from tests.helpers import load_dir, rewrite_tensor, stored, tree
from tests.s3server import S3Server
from tests.test_cli import realign


def key_of(res: subprocess.CompletedProcess[str]) -> str:
    """The key a command printed last (it must have succeeded)."""
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def weights(directory: Path) -> dict[str, bytes]:
    """The bytes of a model's or a pack's weight files (not its manifest or card)."""
    files = [*directory.glob("*.safetensors"), *directory.glob("*.frames")]
    files += directory.glob("*.index.json")
    assert files, f"no weight files in {directory}"
    return {f.name: f.read_bytes() for f in files}


def residuals(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "residuals").iterdir())


def test_bf16_pack_to_exact_gives_the_bytes_of_no_cache(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    pair, st = ["-b", str(t.base), "-i", str(t.instruct)], ["--store", str(store_dir)]
    old = key_of(realign("compute", *pair, "--pack", "bf16", *st))
    res = realign("convert", old[:8], "--pack", "exact", *st)
    new = key_of(res)
    assert new != old and "computed" in res.stderr
    assert key_of(realign("compute", *pair, "--pack", "exact", *st)) == new  # the content key
    assert residuals(store_dir) == sorted([old, new])
    assert "exact (lossless)" in realign("inspect", new, *st).stdout
    assert "lossy" in realign("inspect", old, *st).stdout

    fused, applied, rounded = tmp_path / "fused", tmp_path / "applied", tmp_path / "rounded"
    target = ["-t", str(t.new_base)]
    assert realign("merge", *pair, *target, "-o", str(fused), "--no-cache", *st).returncode == 0
    assert realign("apply", "-r", new, *target, "-o", str(applied), *st).returncode == 0
    assert realign("apply", "-r", old, *target, "-o", str(rounded), *st).returncode == 0
    assert weights(applied) == weights(fused)
    assert weights(rounded) != weights(fused)  # what the conversion recovers: R unrounded


def test_exact_pack_to_bf16_and_rm_old(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    pair, st = ["-b", str(t.base), "-i", str(t.instruct)], ["--store", str(store_dir)]
    old = key_of(realign("compute", *pair, *st))  # the default format: exact
    res = realign("convert", old, "--dtype", "bfloat16", "--rm-old", *st)
    new = key_of(res)
    assert new != old and "the old pack was removed" in res.stderr
    assert residuals(store_dir) == [new]
    assert "bfloat16 (lossy" in realign("inspect", new, *st).stdout

    other = tmp_path / "other"  # the bf16 pack computed directly: same key, same bytes
    assert key_of(realign("compute", *pair, "--pack", "bf16", "--store", str(other))) == new
    assert weights(store_dir / "residuals" / new) == weights(other / "residuals" / new)


def test_same_format_is_a_no_op(llama_triple: TinyTriple, store_dir: Path) -> None:
    t = llama_triple
    pair, st = ["-b", str(t.base), "-i", str(t.instruct)], ["--store", str(store_dir)]
    key = key_of(realign("compute", *pair, "--pack", "fp16", *st))
    before = tree(store_dir / "residuals")
    for name in ("float16", "fp16"):
        res = realign("convert", key[:10], "--pack", name, "--rm-old", *st)
        assert key_of(res) == key and "float16 already" in res.stderr
    assert tree(store_dir / "residuals") == before


def test_sources_gone_or_changed_is_one_line_with_the_command(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    base = Path(shutil.copytree(llama_triple.base, models / "base"))
    instruct = Path(shutil.copytree(llama_triple.instruct, models / "instruct"))
    st = ["--store", str(store_dir)]
    key = key_of(realign("compute", "-b", str(base), "-i", str(instruct), "--pack", "bf16", *st))
    kept = stored(store_dir)
    redo = f"`realign compute --base {base} --instruct {instruct} --pack exact`"

    instruct.rename(models / "moved")  # a local directory that moved
    res = realign("convert", key, "--pack", "exact", *st)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert f"instruct {instruct}: no such directory" in res.stderr and redo in res.stderr
    assert f"base {base}:" not in res.stderr  # the base is where it was

    (models / "moved").rename(instruct)
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_tensor(base, name, torch.zeros_like(load_dir(base)[name]))
    res = realign("convert", key, "--pack", "exact", *st)
    assert res.returncode == 1, res.stderr
    assert f"base {base}: its files changed since the pack was computed" in res.stderr
    assert redo in res.stderr and "Traceback" not in res.stderr
    assert stored(store_dir) == kept  # nothing computed, the old pack untouched

    res = realign("convert", key, "--pack", "int2", *st)
    assert res.returncode == 1 and "pack format" in res.stderr


def test_api_keeps_a_pack_a_job_reads(llama_triple: TinyTriple, store_dir: Path) -> None:
    from app.merge import compute, convert, open_store

    t = llama_triple
    old = compute(str(t.base), str(t.instruct), dtype="bfloat16", store=store_dir).key
    heard: list[str] = []
    with open_store(store_dir).using(old):  # a reader (a running job) holds the old pack
        res = convert(old, "exact", remove_old=True, store=store_dir, notice=heard.append)
    assert res.created and not res.removed_old and res.old_key == old
    assert res.manifest.exact and res.manifest.key == res.key
    assert len(heard) == 1 and f"`realign rm {old}`" in heard[0]
    assert residuals(store_dir) == sorted([old, res.key])

    again = convert(old[:8], "exact", remove_old=True, store=store_dir)
    assert again.key == res.key and not again.created and again.removed_old
    assert residuals(store_dir) == [res.key]


def test_a_changed_manifest_is_refused(llama_triple: TinyTriple, store_dir: Path) -> None:
    from app.core.errors import ArtifactCorruptError
    from app.merge import compute, convert

    t = llama_triple
    res = compute(str(t.base), str(t.instruct), dtype="bfloat16", store=store_dir)
    manifest = res.path / "manifest.json"
    text = manifest.read_text()
    before = stored(store_dir)
    for changed in (text.replace(res.manifest.base.digest, "0" * 64), "{not json"):
        manifest.write_text(changed)
        with pytest.raises(ArtifactCorruptError, match=f"`realign verify {res.key}`"):
            convert(res.key, "exact", store=store_dir)
        assert stored(store_dir) == before  # nothing computed


def test_object_store_sources_convert_and_their_loss_is_named(
    llama_triple: TinyTriple, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from app.core.errors import SourcesUnavailableError
    from app.core.settings import Settings
    from app.merge import compute, convert

    client = s3_server.client()
    refs = []
    for model in (llama_triple.base, llama_triple.instruct):
        for f in model.iterdir():
            client.upload_file(str(f), bucket, f"models/{model.name}/{f.name}")
        refs.append(f"s3://{bucket}/models/{model.name}")
    settings = Settings(models_cache_dir=tmp_path / "store", s3_endpoint_url=s3_server.endpoint)
    old = compute(*refs, dtype="bfloat16", settings=settings)
    new = convert(old.key, "exact", settings=settings)  # pinned refs, checked by the key
    assert new.created and new.manifest.exact and new.manifest.base.ref == old.manifest.base.ref

    gone = client.list_objects_v2(Bucket=bucket, Prefix="models/instruct/")["Contents"]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in gone]})
    before = stored(tmp_path / "store")
    with pytest.raises(SourcesUnavailableError) as err:
        convert(old.key, "float16", settings=settings)
    assert "models/instruct" in str(err.value) and "no model files there" in str(err.value)
    assert f"--instruct {old.manifest.instruct.ref} --pack float16`" in str(err.value)
    assert stored(tmp_path / "store") == before
