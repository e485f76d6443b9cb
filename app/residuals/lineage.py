"""Lineage check: do the instruct model and the target descend from the base?

Task arithmetic transfers ``instruct - base`` onto a target only when all three are one
lineage: fine-tuned or continually pre-trained from the same base. Independently trained
models of the same architecture pass every header check (names, shapes, vocabulary) and
still merge into noise, so preflight also compares weights, cheaply: a fixed, seeded
sample of rows of a few tensors (the embedding, and one attention and one MLP weight of
the first, middle and last layers), read with ranged reads, never whole checkpoints.

The figure is the relative distance ``|x - base| / |base|`` over the sampled rows of each
tensor; the median over the tensors is held against the limit. Calibration:

* models of one lineage: published fine-tunes and instruction tunes move weights by about
  1e-3 to 1e-2 per tensor, long continual pre-training by up to a few tenths. Measured
  (``bench/lineage.py``): the demo's trained tiny models (``app.demo.train``: 300
  pre-training steps, then instruction tuning and continual pre-training) 0.095
  (instruct) and 0.051 (new base); the 1.1B bench triple 0.050 and 0.100; the random
  test triples (``app.demo.tiny``, noise of half the init scale) 0.50.
* unrelated models: independently initialised or trained weights are uncorrelated, so
  ``|x - b|^2 = |x|^2 + |b|^2`` and the figure is ``sqrt(1 + (|x|/|b|)^2)``: at least 1,
  and sqrt(2) = 1.41 at equal norms. A tiny model of the same config from another seed
  measures 1.42, the demo's recipe trained from another seed 1.42 too.

The default limit, 0.8 (``REALIGN_LINEAGE_MAX_DISTANCE``), sits 1.6x above the noisiest
related pair measured and 1.25x below the lowest figure uncorrelated weights can give.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import zlib
from collections.abc import Mapping, Sequence

from app.core.errors import UnrelatedModelsError
from app.residuals.checkpoint import Checkpoint, TensorInfo
from app.residuals.devices import MathBackend, make_backend
from app.residuals.dtypes import F32
from app.residuals.manifest import LineageDistance, LineageInfo
from app.residuals.methods import get_method

ROWS = 16  # rows sampled per tensor: ~16 x hidden elements, figures to about 1%
SEED = 0
MAX_ROW_BYTES = 1 << 20  # a "row" this large is not a weight row worth sampling
LIMITED = ("instruct-base", "target-base")  # 'target-instruct' is recorded only
_LAYER = re.compile(r"\.(\d+)\.")
_ATTN = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn")
_WHY = (
    "task arithmetic needs models of one lineage (fine-tuned or continually pre-trained "
    "from the same base); across families the residual does not transfer and the merge "
    "produces noise"
)


def sample_tensors(tensors: Mapping[str, TensorInfo]) -> list[str]:
    """The tensors the check samples: the embedding, then one attention and one MLP
    weight of the first, middle and last layers (evenly spaced float matrices where
    names follow no known pattern)."""
    mats = sorted(n for n, t in tensors.items() if t.is_float and len(t.shape) >= 2)
    picked = [n for n in mats if "embed" in n][:1]
    layers: dict[int, list[str]] = {}
    for name in mats:
        if found := _LAYER.search(name):
            layers.setdefault(int(found.group(1)), []).append(name)
    if layers:
        order = sorted(layers)
        for idx in dict.fromkeys((order[0], order[len(order) // 2], order[-1])):
            for keys in (_ATTN, _MLP):
                hit = next((n for n in layers[idx] if any(k in n for k in keys)), None)
                if hit is not None and hit not in picked:
                    picked.append(hit)
    if len(picked) < 3 and mats:  # unknown naming: spread over the float matrices
        step = max(1, len(mats) // 7)
        picked = list(dict.fromkeys([*picked, *mats[::step][:7]]))
    return picked


def _as_rows(t: TensorInfo) -> TensorInfo:
    """``t`` seen as a matrix of its last dimension's rows (so 3-D experts sample
    rows, not whole experts)."""
    if len(t.shape) == 2:
        return t
    rows = math.prod(t.shape[:-1])
    return TensorInfo(t.name, t.file, t.dtype, (rows, t.shape[-1]), t.offset, t.nbytes)


def _read_rows(ckpt: Checkpoint, t: TensorInfo, rows: list[int]) -> memoryview:
    buf = memoryview(bytearray(len(rows) * t.row_bytes))
    for i, r in enumerate(rows):
        ckpt.read_into(t, r, r + 1, buf[i * t.row_bytes : (i + 1) * t.row_bytes])
    return buf


def _rows_of(name: str, infos: list[TensorInfo], rows: int, seed: int) -> list[int] | None:
    """Seeded sample of the rows every model has (a grown vocabulary adds rows at the
    end), of the tensors as :func:`_as_rows` sees them; None when the tensors cannot be
    compared row by row."""
    first = infos[0]
    if any(t.shape[1:] != first.shape[1:] or not t.is_float for t in infos):
        return None
    if len(first.shape) > 2 and any(t.shape != first.shape for t in infos):
        return None
    flat = [_as_rows(t) for t in infos]
    common = min(t.rows for t in flat)
    if common == 0 or flat[0].row_bytes > MAX_ROW_BYTES:
        return None
    rng = random.Random(seed ^ zlib.crc32(name.encode()))
    return sorted(rng.sample(range(common), min(rows, common)))


def _sumsq(backend: MathBackend, kind: str, inputs: list[tuple[memoryview, TensorInfo]]) -> float:
    n = inputs[0][0].nbytes // inputs[0][1].dtype.itemsize
    out = memoryview(bytearray(n * F32.itemsize))
    ops = [(mv, t.dtype) for mv, t in inputs]
    method = get_method("task_arithmetic")
    return backend.combine(method, kind, ops, out, F32, 1.0, want_stats=True)[0]


def _pairs(models: Mapping[str, Checkpoint]) -> list[tuple[str, str]]:
    pairs = [(role, "base") for role in models]
    if "instruct" in models and "target" in models:
        pairs.append(("target", "instruct"))
    return pairs


def _tensor_figures(
    backend: MathBackend,
    name: str,
    ckpts: Mapping[str, Checkpoint],
    pairs: list[tuple[str, str]],
    picked: list[int],
) -> dict[str, float | str]:
    """The relative distance of each pair over the sampled rows of one tensor (or why
    there is none: a base sample of zero norm, a non-finite weight)."""
    infos = {r: _as_rows(c.tensors[name]) for r, c in ckpts.items()}
    data = {r: (_read_rows(ckpts[r], infos[r], picked), infos[r]) for r in ckpts}
    norms = {r: _sumsq(backend, "convert", [data[r]]) for r in {b for _, b in pairs}}
    found: dict[str, float | str] = {}
    for a, b in pairs:
        diff = _sumsq(backend, "residual", [data[a], data[b]])
        d = math.sqrt(diff / norms[b]) if norms[b] > 0 else math.nan
        found[f"{a}-{b}"] = d if math.isfinite(d) else f"{name}: {a}-{b} has no finite figure"
    return found


def measure(
    base: Checkpoint,
    models: Mapping[str, Checkpoint],
    *,
    rows: int = ROWS,
    seed: int = SEED,
) -> tuple[dict[str, LineageDistance], list[str]]:
    """Relative distances of ``models`` (by role: ``instruct``, ``target``) from
    ``base`` over the sampled rows, plus ``target-instruct`` when both are given.

    Returns:
        The distances by pair (``<role>-base``), and what could not be measured.
    """
    ckpts = {"base": base, **models}
    pairs = _pairs(models)
    per: dict[str, dict[str, float]] = {f"{a}-{b}": {} for a, b in pairs}
    skipped: list[str] = []
    backend = make_backend("cpu")
    try:
        for name in sample_tensors(base.tensors):
            infos = [c.tensors.get(name) for c in ckpts.values()]
            present = [t for t in infos if t is not None]
            picked = _rows_of(name, present, rows, seed) if len(present) == len(infos) else None
            if picked is None:
                skipped.append(f"{name}: shapes or kinds differ; not sampled")
                continue
            for pair, d in _tensor_figures(backend, name, ckpts, pairs, picked).items():
                if isinstance(d, str):
                    skipped.append(d)
                else:
                    per[pair][name] = d
    finally:
        backend.close()
    out = {
        pair: LineageDistance(median=statistics.median(v.values()), max=max(v.values()), tensors=v)
        for pair, v in per.items()
        if v
    }
    return out, skipped


def judge(
    distances: Mapping[str, LineageDistance],
    skipped: list[str],
    *,
    max_distance: float,
    force: bool,
    rows: int = ROWS,
    seed: int = SEED,
) -> LineageInfo:
    """The record of the check; refuses a pair past the limit unless ``force``.

    Raises:
        UnrelatedModelsError: ``instruct-base`` or ``target-base`` exceeds
            ``max_distance`` and ``force`` is not set.
    """
    over = {p: d for p, d in distances.items() if p in LIMITED and d.median > max_distance}
    info = LineageInfo(
        rows_per_tensor=rows, seed=seed, max_distance=max_distance, forced=force,
        passed=not over, distances=dict(distances), skipped=skipped,
    )  # fmt: skip
    if over and not force:
        raise UnrelatedModelsError(refusal(over, distances, max_distance))
    return info


def refusal(
    over: Mapping[str, LineageDistance],
    distances: Mapping[str, LineageDistance],
    max_distance: float,
) -> str:
    """What was measured, the limit, why it matters and how to override."""
    pair, d = next(iter(over.items()))
    model = pair.split("-")[0]
    others = "; ".join(f"{p} {v.median:.3g}" for p, v in distances.items() if p != pair)
    return (
        f"{model} does not descend from the base: |{model} - base| / |base| is {d.median:.3g} "
        f"(median over {len(d.tensors)} sampled tensors, max {d.max:.3g}"
        f"{'; ' + others if others else ''}), above the limit {max_distance:g} "
        "(REALIGN_LINEAGE_MAX_DISTANCE). Fine-tunes measure about 0.001-0.01 and continual "
        "pre-training up to a few tenths; independently trained models measure 1 or more "
        "(about 1.4 at equal weight norms). "
        f"{_WHY[0].upper()}{_WHY[1:]}. Check that base, instruct and target belong "
        'together; to merge anyway, pass --force (realign merge/apply/compute) or "force": '
        "true in POST /merge."
    )


def check_lineage(
    base: Checkpoint,
    models: Mapping[str, Checkpoint],
    *,
    max_distance: float,
    force: bool,
    skipped: list[str] | None = None,
) -> LineageInfo:
    """Measure and judge in one call (see :func:`measure` and :func:`judge`).

    Raises:
        UnrelatedModelsError: a model is not of the base's lineage and ``force`` is unset.
    """
    distances, missed = measure(base, models)
    return judge(distances, [*(skipped or []), *missed], max_distance=max_distance, force=force)


def unmeasured(reason: str, *, max_distance: float, force: bool) -> LineageInfo:
    """The record of a check that could not read the base (nothing refused)."""
    return judge({}, [reason], max_distance=max_distance, force=force)


def combine(infos: Sequence[LineageInfo]) -> LineageInfo:
    """The checks of the residuals of one merge as one record: one residual's as it is;
    several, each pair named after its residual (``residuals[1] target-base``), passed
    when every one passed."""
    if len(infos) == 1:
        return infos[0]
    first = infos[0]
    return LineageInfo(
        rows_per_tensor=first.rows_per_tensor,
        seed=first.seed,
        max_distance=first.max_distance,
        forced=any(i.forced for i in infos),
        passed=all(i.passed for i in infos),
        distances={
            f"residuals[{n}] {pair}": d
            for n, info in enumerate(infos)
            for pair, d in info.distances.items()
        },
        skipped=[f"residuals[{n}] {why}" for n, info in enumerate(infos) for why in info.skipped],
    )
