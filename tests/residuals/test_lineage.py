"""The lineage check: unrelated models of the same architecture are refused before any
write, ``force`` merges them anyway, and every merge records the figures."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from app.core.errors import IncompatibleModelsError, UnrelatedModelsError
from app.core.settings import Settings
from app.demo.tiny import TinyTriple, write_model
from app.merge import ResidualInput, apply, compute, merge, merge_to_store, preflight
from app.residuals.card import render_card
from app.residuals.checkpoint import Checkpoint
from app.residuals.lineage import ROWS, measure, sample_tensors
from app.residuals.manifest import (
    MERGE_MANIFEST,
    SEAL,
    MergeManifest,
    read_merge_manifest,
)
from tests.helpers import copy_model, load_dir, rewrite_tensor, stored

LIMIT = Settings().lineage_max_distance


def _figures(base: Path, **models: Path) -> dict[str, float]:
    with Checkpoint.open(base) as b:
        opened = {role: Checkpoint.open(path) for role, path in models.items()}
        try:
            distances, skipped = measure(b, opened)
        finally:
            for c in opened.values():
                c.close()
    assert skipped == []
    return {pair: d.median for pair, d in distances.items()}


def test_calibration_related_and_unrelated_sit_on_either_side_with_margin(
    llama_triple: TinyTriple, llama_unrelated: Path
) -> None:
    t = llama_triple
    related = _figures(t.base, instruct=t.instruct, target=t.new_base)
    # The generated triples move every weight by noise of half the init scale: 0.5.
    assert 0.45 < related["instruct-base"] < 0.55 and 0.45 < related["target-base"] < 0.55
    unrelated = _figures(t.base, target=llama_unrelated)["target-base"]
    assert 1.35 < unrelated < 1.48  # sqrt(2): uncorrelated weights of equal norm
    assert related["target-base"] * 1.5 < LIMIT < unrelated / 1.5


def test_sample_is_seeded_and_spans_the_model(
    llama_triple: TinyTriple, llama_triple_extra_vocab: TinyTriple
) -> None:
    with Checkpoint.open(llama_triple.base) as b:
        names = sample_tensors(b.tensors)
    assert names[0] == "model.embed_tokens.weight"
    assert any(".layers.0.self_attn." in n for n in names)
    assert any(".layers.1.mlp." in n for n in names)  # the last layer of two
    once = _figures(llama_triple.base, target=llama_triple.new_base)
    assert _figures(llama_triple.base, target=llama_triple.new_base) == once
    # An instruct model with more vocabulary rows is compared on the rows both have.
    e = llama_triple_extra_vocab
    assert _figures(e.base, instruct=e.instruct)["instruct-base"] < LIMIT


def test_a_non_finite_tensor_is_left_out_not_fatal(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t = llama_triple
    target = copy_model(t.new_base, tmp_path / "nan")
    name = "model.layers.0.self_attn.k_proj.weight"
    shape = load_dir(t.new_base)[name].shape
    rewrite_tensor(target, name, torch.full(shape, math.nan, dtype=torch.bfloat16))
    with Checkpoint.open(t.base) as b, Checkpoint.open(target) as c:
        distances, skipped = measure(b, {"target": c})
    assert skipped == [f"{name}: target-base has no finite figure"]
    assert name not in distances["target-base"].tensors
    assert 0.45 < distances["target-base"].median < 0.55


@pytest.mark.parametrize("no_cache", [False, True])
def test_unrelated_target_is_refused_before_any_write(
    llama_triple: TinyTriple,
    llama_unrelated: Path,
    store_dir: Path,
    tmp_path: Path,
    no_cache: bool,
) -> None:
    t, out = llama_triple, tmp_path / "out"
    with pytest.raises(UnrelatedModelsError) as exc:
        merge(str(t.base), str(t.instruct), str(llama_unrelated), out, store=store_dir,
              no_cache=no_cache)  # fmt: skip
    err = exc.value
    assert isinstance(err, IncompatibleModelsError) and err.code == "unrelated_models"
    msg = str(err)
    assert "target does not descend from the base" in msg
    assert "|target - base| / |base| is 1.4" in msg and f"limit {LIMIT:g}" in msg
    assert "REALIGN_LINEAGE_MAX_DISTANCE" in msg and "one lineage" in msg
    assert "--force" in msg and '"force": true in POST /merge' in msg
    assert stored(store_dir) == [] and not out.exists()


def test_force_merges_and_records_the_figures(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    t, out = llama_triple, tmp_path / "forced"
    res = merge(str(t.base), str(t.instruct), str(llama_unrelated), out, store=store_dir,
                force=True)  # fmt: skip
    info = res.manifest.lineage
    assert info is not None and info.forced and not info.passed
    assert info.distances["target-base"].median > 1.3
    assert info.distances["instruct-base"].median < LIMIT
    assert info.rows_per_tensor == ROWS and info.max_distance == LIMIT
    assert read_merge_manifest(out).lineage == info
    card = (out / "README.md").read_text()
    assert "Lineage check" in card and "--force" in card and "target vs base 1.4" in card


def test_related_merges_record_the_figures_on_every_path(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    runs = {
        "fused": dict(no_cache=True),
        "one pass": {},  # residual not stored yet: residual and model in one pass
        "stored residual": {},  # now it is: compute reuses it, apply reads it
    }
    for i, (how, kw) in enumerate(runs.items()):
        out = tmp_path / f"out{i}"
        res = merge(str(t.base), str(t.instruct), str(t.new_base), out, store=store_dir, **kw)  # type: ignore[arg-type]
        info = read_merge_manifest(out).lineage
        assert info is not None and info.passed and not info.forced, how
        assert set(info.distances) == {"instruct-base", "target-base", "target-instruct"}, how
        assert info.distances["target-base"].median < LIMIT, how
        assert res.manifest.lineage == info, how
        assert "Lineage check" in (out / "README.md").read_text(), how


def test_apply_checks_the_target_against_the_residual_base(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    key = compute(str(t.base), str(t.instruct), store=store_dir).key
    before = stored(store_dir)
    with pytest.raises(UnrelatedModelsError, match="target does not descend"):
        apply(key, str(llama_unrelated), tmp_path / "a", store=store_dir)
    assert stored(store_dir) == before and not (tmp_path / "a").exists()
    with pytest.raises(UnrelatedModelsError):
        preflight(target=str(llama_unrelated), residual=key, store=store_dir)
    res = apply(key, str(llama_unrelated), tmp_path / "b", store=store_dir, force=True)
    assert res.manifest.lineage is not None and res.manifest.lineage.forced
    good = apply(key, str(t.new_base), tmp_path / "c", store=store_dir)
    assert good.manifest.lineage is not None and good.manifest.lineage.passed
    info = preflight(target=str(t.new_base), residual=key, store=store_dir)
    assert (
        info is not None
        and info.distances["target-base"] == (good.manifest.lineage.distances["target-base"])
    )


def test_apply_without_the_base_at_hand_records_why(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    base = shutil.copytree(t.base, tmp_path / "gone")
    key = compute(str(base), str(t.instruct), store=store_dir).key
    shutil.rmtree(base)
    res = apply(key, str(t.new_base), tmp_path / "out", store=store_dir)
    info = res.manifest.lineage
    assert info is not None and info.passed and info.distances == {}
    assert len(info.skipped) == 1 and f"is not at {base}" in info.skipped[0]


def test_compute_refuses_an_unrelated_instruct_model(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    stranger = write_model(tmp_path / "stranger", seed=11, chat=True)
    with pytest.raises(UnrelatedModelsError, match="instruct does not descend from the base"):
        compute(str(t.base), str(stranger), store=store_dir)
    assert stored(store_dir) == []
    res = compute(str(t.base), str(stranger), store=store_dir, force=True)
    assert res.lineage is not None and res.lineage.forced and not res.lineage.passed
    ok = compute(str(t.base), str(t.instruct), store=store_dir)
    assert ok.lineage is not None and ok.lineage.passed


def test_force_reaches_the_methods_that_apply_a_stored_pack(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """ties, dare and several residuals compute their packs through the same check, and
    ``force`` gets them past it."""
    t = llama_triple
    stranger = write_model(tmp_path / "stranger", seed=11, chat=True)
    req = {"base": str(t.base), "instruct": str(stranger), "target": str(t.new_base)}
    with pytest.raises(UnrelatedModelsError):
        merge(**req, out=tmp_path / "no", method="ties", store=store_dir)
    assert not (tmp_path / "no").exists()
    out = merge(**req, out=tmp_path / "yes", method="ties", store=store_dir, force=True).out
    assert (out / "config.json").is_file()


def test_the_limit_is_a_setting(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    t = llama_triple
    loose = Settings(models_cache_dir=store_dir, lineage_max_distance=2.0)
    res = merge(str(t.base), str(t.instruct), str(llama_unrelated), tmp_path / "a",
                no_cache=True, settings=loose)  # fmt: skip
    assert res.manifest.lineage is not None and res.manifest.lineage.passed
    tight = Settings(models_cache_dir=store_dir, lineage_max_distance=0.1)
    with pytest.raises(UnrelatedModelsError, match=r"limit 0\.1 "):
        preflight(target=str(t.new_base), base=str(t.base), instruct=str(t.instruct),
                  settings=tight)  # fmt: skip


def test_manifests_written_before_the_check_still_read(
    llama_triple: TinyTriple, tmp_path: Path
) -> None:
    t, out = llama_triple, tmp_path / "old"
    merge(str(t.base), str(t.instruct), str(t.new_base), out, no_cache=True)
    data = json.loads((out / MERGE_MANIFEST).read_text())
    del data["lineage"], data[SEAL]
    # Sealed as the version before the check sealed it: no 'lineage' field at all.
    data[SEAL] = "0" * 64
    raw = (json.dumps(data, indent=2) + "\n").encode()
    cut = raw.rindex(b"0" * 64)
    sealed = raw[:cut] + hashlib.sha256(raw).hexdigest().encode() + raw[cut + 64 :]
    (out / MERGE_MANIFEST).write_bytes(sealed)
    old = read_merge_manifest(out)
    assert isinstance(old, MergeManifest) and old.lineage is None
    assert "Lineage check" not in render_card(old)


# -- ties, dare and several residuals: the same check, of the target against each base --
def _two_packs(t: TinyTriple, store: Path, root: Path) -> list[ResidualInput]:
    """The instruct model's residual and a second one (a light fine-tune) of one base."""
    domain = write_model(root / "domain", seed=11, like=t.base, delta_scale=0.005)
    keys = [compute(str(t.base), str(m), store=store).key for m in (t.instruct, domain)]
    return [ResidualInput(key=keys[0]), ResidualInput(key=keys[1], weight=0.5)]


def test_method_and_multi_merges_record_the_lineage(
    llama_triple: TinyTriple, store_dir: Path, tmp_path: Path
) -> None:
    """ties of a pair, several residuals by dare, and merges into the store record the
    figures in the manifest and the card, as task arithmetic does; the preflight
    returns the same figures."""
    t = llama_triple
    res = merge(str(t.base), str(t.instruct), str(t.new_base), tmp_path / "ties",
                method="ties", store=store_dir)  # fmt: skip
    pair = res.manifest.lineage
    assert pair is not None and pair.passed and not pair.forced
    assert set(pair.distances) == {"instruct-base", "target-base", "target-instruct"}
    assert read_merge_manifest(res.out).lineage == pair
    assert "Lineage check" in (res.out / "README.md").read_text()
    several = _two_packs(t, store_dir, tmp_path)
    multi = apply(several, str(t.new_base), tmp_path / "dare", method="dare", store=store_dir)
    info = multi.manifest.lineage
    assert info is not None and info.passed
    pairs = ("target-base", "target-instruct", "instruct-base")
    assert set(info.distances) == {f"residuals[{n}] {p}" for n in (0, 1) for p in pairs}
    assert info.distances["residuals[0] target-base"] == pair.distances["target-base"]
    assert "residuals[1] target vs base" in (multi.out / "README.md").read_text()
    assert preflight(target=str(t.new_base), residuals=several, method="dare",
                     store=store_dir) == info  # fmt: skip
    done = merge_to_store(target=str(t.new_base), residuals=several, store=store_dir)
    assert done.manifest.lineage == info


def test_method_and_multi_merges_refuse_an_unrelated_target(
    llama_triple: TinyTriple, llama_unrelated: Path, store_dir: Path, tmp_path: Path
) -> None:
    """An unrelated target is refused by ties (before its pack is computed) and by a
    merge of several residuals, in preflight too; ``force`` merges and says so."""
    t, target = llama_triple, str(llama_unrelated)
    with pytest.raises(UnrelatedModelsError, match="target does not descend"):
        merge(str(t.base), str(t.instruct), target, tmp_path / "no", method="ties",
              store=store_dir)  # fmt: skip
    assert stored(store_dir) == [] and not (tmp_path / "no").exists()
    several = _two_packs(t, store_dir, tmp_path)
    before = stored(store_dir)
    with pytest.raises(UnrelatedModelsError, match="target does not descend"):
        preflight(target=target, residuals=several, store=store_dir)
    with pytest.raises(UnrelatedModelsError, match="target does not descend"):
        merge_to_store(target=target, residuals=several, method="ties", store=store_dir)
    with pytest.raises(UnrelatedModelsError):
        apply(several, target, tmp_path / "no", store=store_dir)
    assert stored(store_dir) == before and not (tmp_path / "no").exists()
    res = apply(several, target, tmp_path / "yes", method="ties", store=store_dir, force=True)
    info = res.manifest.lineage
    assert info is not None and info.forced and not info.passed
    assert info.distances["residuals[1] target-base"].median > 1.3
    assert "--force" in (res.out / "README.md").read_text()
