"""Size against fidelity of residual pack formats on the demo's trained tiny models.

For each format (exact, bfloat16, int8, int4, bitdelta) the pack of the demo's
(instruct, base) is computed with Realign and applied to the demo's new base; the merged
model is compared with the merge from the exact residual (``--no-cache``, the same bits
as the exact pack's): relative Frobenius error of R, greedy-token agreement and mean
KL of next-token distributions over the demo's chat questions (teacher-forced on the
exact model's greedy continuation; :mod:`app.pipeline.fidelity`).

Then the group sizes: the same figures for variants of the codecs (a scale per row or
per 128 / 64 elements), computed in memory with the codecs of :mod:`app.residuals.lossy`
(``target + R_hat`` rounded once to bf16, the bits a pack of that variant gives; checked
against the int8 pack's merge), on the demo residual (rows of 256 and 512 elements), and
the error of R alone on synthetic rows of 4096 elements, the width of real models'
rows (Gaussian, and Student-t with 3 degrees of freedom for heavy tails; per-row
spreads log-normal). The format table is also made for a random tiny Qwen2 triple
(``make_triple``) over the built-in prompt set.

    .venv/bin/python bench/lossy.py [--demo bench/data/demo] [--tokens 32]

The demo models are trained once into ``--demo`` (about 10 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.demo.tiny import TinyTriple, make_triple  # noqa: E402
from app.demo.train import cached_triple, make_trained_triple, news_facts, old_facts  # noqa: E402
from app.merge import apply, compute, merge  # noqa: E402
from app.pipeline.fidelity import (  # noqa: E402
    DEFAULT_PROMPTS,
    ModelFidelity,
    compare_models,
    encode_prompts,
)
from app.residuals.lossy import FORMATS as FORMATS_BY_NAME  # noqa: E402
from app.residuals.lossy import Absmax, LossyFormat, SignMean  # noqa: E402
from tests.helpers import load_dir  # noqa: E402
from tests.residuals import methods_reference as ref  # noqa: E402

FORMATS = ("exact", "bfloat16", "int8", "int4", "bitdelta")
VARIANTS: list[LossyFormat] = [
    Absmax("int8 per row", 8, 0),
    Absmax("int8 g128", 8, 128),
    Absmax("int8 g64", 8, 64),
    Absmax("int4 per row", 4, 0),
    Absmax("int4 g128", 4, 128),
    Absmax("int4 g64", 4, 64),
    SignMean("bitdelta per row"),
]


def prompts() -> list[str]:
    """Every demo fact asked once, as the instruct model was tuned to be asked."""
    return [f.questions()[0] for f in (*old_facts(), *news_facts())]


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def residual(instruct: Path, base: Path) -> dict[str, np.ndarray]:
    ins, bas = load_dir(instruct), load_dir(base)
    return {n: (ins[n].float() - bas[n].float()).numpy() for n in ins if ins[n].is_floating_point()}


def rel_error(r_hat: dict[str, np.ndarray], r: dict[str, np.ndarray]) -> float:
    err = sum(float(np.square(r_hat[n].astype(np.float64) - r[n]).sum()) for n in r)
    ref = sum(float(np.square(r[n].astype(np.float64)).sum()) for n in r)
    return math.sqrt(err / ref)


def coded(fmt: LossyFormat, r: np.ndarray) -> tuple[np.ndarray, int]:
    """R_hat of one tensor under ``fmt`` (vectors kept in fp32) and its stored bytes."""
    if r.ndim < 2:
        return r, r.nbytes
    x = r.reshape(r.shape[0], -1)
    codes, scales = fmt.encode(x)
    out = np.empty_like(x)
    fmt.decode(codes, scales, out)
    return out.reshape(r.shape), codes.nbytes + scales.nbytes


def merged_model(like: torch.nn.Module, target: dict[str, torch.Tensor],
                 r_hat: dict[str, np.ndarray]) -> torch.nn.Module:  # fmt: skip
    """``like`` holding ``target + R_hat`` rounded once to the target's dtype (bf16 or
    fp32)."""
    import copy

    model = copy.deepcopy(like)
    state = {}
    for n, t in target.items():  # exact sum, one rounding: the engine's result
        bits = ref.apply(r_hat[n].reshape(-1), t.float().numpy().reshape(-1), 1.0, t.dtype)
        state[n] = torch.from_numpy(bits).view(t.dtype).reshape(t.shape).float()
    model.load_state_dict(state, strict=False)
    return model


def row(name: str, size: int, bf16: int, err: float, fid: ModelFidelity) -> str:
    return (
        f"| {name} | {size / 1e6:.3f} MB | {size / bf16:.3f} | {err:.3g} | "
        f"{100 * fid.token_agreement:.2f}% | {fid.mean_kl:.3g} | {fid.max_kl:.3g} |"
    )


HEAD = (
    "| pack | weight bytes | x bf16 | rel. Frobenius error of R | greedy-token agreement "
    "| mean KL (nats) | max KL (nats) |\n|---|---|---|---|---|---|---|"
)


def table(triple: TinyTriple, ask: list[str], tokens: int, tmp: Path) -> dict[str, Path]:
    """The format table of one triple; returns each format's merged model directory."""
    ids = encode_prompts(triple.instruct, ask)
    r = residual(triple.instruct, triple.base)
    store = tmp / "store"
    ref_dir = merge(str(triple.base), str(triple.instruct), str(triple.new_base),
                    tmp / "reference", no_cache=True, store=store).out  # fmt: skip
    reference = load_model(ref_dir)
    print(f"{len(ask)} prompts, up to {tokens} tokens each\n\n{HEAD}")
    bf16 = 2 * sum(x.size for x in r.values())
    merged: dict[str, Path] = {"reference": ref_dir}
    for fmt in FORMATS:
        res = compute(str(triple.base), str(triple.instruct), dtype=fmt, store=store)
        merged[fmt] = apply(res.key, str(triple.new_base), tmp / fmt, store=store).out
        r_hat = {n: t.float().numpy() for n, t in load_dir(res.path).items() if n in r}
        err = rel_error(r_hat, r) if fmt != "exact" else 0.0
        if res.manifest.fidelity is not None:  # the figure recorded at creation
            assert math.isclose(err, res.manifest.fidelity.rel_error, rel_tol=1e-4)
        fid = compare_models(reference, load_model(merged[fmt]), ids, tokens)
        size = res.manifest.storage()["weight_bytes"]
        print(row(fmt, size, bf16, err, fid), flush=True)
    return merged


def variants(triple: TinyTriple, ask: list[str], tokens: int, merged: dict[str, Path]) -> None:
    """The codec variants, in memory, on ``triple``'s residual."""
    ids = encode_prompts(triple.instruct, ask)
    r = residual(triple.instruct, triple.base)
    bf16 = 2 * sum(x.size for x in r.values())
    target = load_dir(triple.new_base)
    reference = load_model(merged["reference"])
    int8 = {n: coded(FORMATS_BY_NAME["int8"], x)[0] for n, x in r.items()}
    in_memory = merged_model(reference, target, int8).state_dict()
    written = load_dir(merged["int8"])
    for n in r:  # the in-memory merge is the pack's merge, bit for bit
        assert torch.equal(in_memory[n].to(written[n].dtype), written[n]), n
    print(f"\nCodec variants (in memory), demo residual:\n\n{HEAD}")
    for fmt in VARIANTS:
        done = {n: coded(fmt, x) for n, x in r.items()}
        r_hat = {n: v[0] for n, v in done.items()}
        size = sum(v[1] for v in done.values())
        fid = compare_models(reference, merged_model(reference, target, r_hat), ids, tokens)
        print(row(fmt.name, size, bf16, rel_error(r_hat, r), fid), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "bench" / "data" / "demo")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    triple = cached_triple(args.demo) or make_trained_triple(args.demo, progress=print)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        print(f"\nTrained demo Llama ({args.demo}), the demo's chat questions:")
        (tmp / "demo").mkdir()
        merged = table(triple, prompts(), args.tokens, tmp / "demo")
        print("\nRandom tiny Qwen2 (make_triple, seed 0), the built-in prompt set:")
        qwen = make_triple(tmp / "qwen", family="qwen2", shards=1)
        (tmp / "q").mkdir()
        table(qwen, list(DEFAULT_PROMPTS), args.tokens, tmp / "q")
        variants(triple, prompts(), args.tokens, merged)
    synthetic()


def synthetic(rows: int = 1024, cols: int = 4096) -> None:
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0, 0.5, size=(rows, 1))) * 1e-3  # rows of unequal spread
    draws = {
        "Gaussian": rng.standard_normal((rows, cols)),
        "Student-t(3)": rng.standard_t(3, size=(rows, cols)),
    }
    print(f"\nSynthetic rows ({rows} x {cols}, log-normal row scales), rel. Frobenius error:\n")
    print("| codec | bits per element | " + " | ".join(draws) + " |")
    print("|---|---|" + "---|" * len(draws))
    for fmt in VARIANTS:
        errs = []
        for d in draws.values():
            x = (d * scale).astype(np.float32)
            r_hat, size = coded(fmt, x)
            errs.append(float(np.linalg.norm((r_hat - x).astype(np.float64)) / np.linalg.norm(x)))
        cells = " | ".join(f"{e:.4g}" for e in errs)
        print(f"| {fmt.name} | {8 * size / (rows * cols):.3f} | {cells} |")


if __name__ == "__main__":
    main()
