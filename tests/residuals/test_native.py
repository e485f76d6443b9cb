"""The native merge kernel: every element is the exact value rounded once, bit for bit.

The reference is independent of the kernel: float64 error-free transformations (TwoSum,
Dekker's TwoProduct) give the exact value as a double-double, their own error terms proving
it exact, and integer arithmetic rounds it to the output format. Single elements are also
checked against :mod:`app.residuals.exact` (rational arithmetic).
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.residuals import exact, native

NP = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
UINT = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}
PREC_EMIN = {"F32": (24, -126), "BF16": (8, -126), "F16": (11, -14)}
ALPHAS = (1.0, 0.7, -0.5, 2.0)
Inputs = list[tuple[np.ndarray, str]]


def bits_of(values: np.ndarray, code: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(np.asarray(values, np.float64).astype(NP[code]).view(UINT[code]))


def value_of(bits: np.ndarray, code: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # signalling NaNs
        if code == "BF16":
            bits = (bits.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(bits.view(NP[code]) if code != "BF16" else bits, np.float64)


def run(kind: str, out_code: str, inputs: Inputs, alpha: float = 1.0) -> np.ndarray:
    n = len(inputs[0][0])
    out = np.full(n, 0x5555, UINT[out_code])
    views = [(b.data.cast("B"), c) for b, c in inputs]
    native.combine(kind, out.data.cast("B"), out_code, views, alpha)
    return out


# ---- the reference -------------------------------------------------------------------


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    t = s - a
    return s, (a - (s - t)) + (b - t)


def two_prod(a: float, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = 134217729.0 * x
        hi = c - (c - x)
        return hi, x - hi

    p = a * b
    ah, al = split(np.full(1, a))
    bh, bl = split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def operands(kind: str, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """(x0, x1, target) of target + a*(x0 - x1) for each kind."""
    zero = np.zeros_like(xs[0])
    return {
        "residual": lambda: (xs[0], xs[1], zero),
        "apply": lambda: (xs[0], zero, xs[1]),
        "fused": lambda: (xs[0], xs[1], xs[2]),
        "convert": lambda: (xs[0], zero, zero),
    }[kind]()


def exact_dd(kind: str, xs: Sequence[np.ndarray], a: float) -> tuple[np.ndarray, np.ndarray]:
    x0, x1, z = operands(kind, xs)
    d, de = two_sum(x0, -x1)
    p, pe = two_prod(a, d)
    s, se = two_sum(z, p)
    lo, loe = two_sum(se, pe)
    assert not de.any() and not loe.any(), "reference precondition: data too wide"
    return two_sum(s, lo)


def round_dd(hi: np.ndarray, lo: np.ndarray, code: str) -> np.ndarray:
    """RNE of hi + lo (hi = RN64 of it) to ``code``, subnormals and overflow included."""
    prec, emin = PREC_EMIN[code]
    neg = hi < 0
    h, low = np.abs(hi), np.where(neg, -lo, lo)
    q = np.maximum(np.frexp(h)[1] - 1, emin) - (prec - 1)
    r, rl = np.ldexp(h, -q), np.ldexp(low, -q)
    whole = np.floor(r)
    c = (r - whole - 0.5) + rl
    whole += (c > 0) | ((c == 0) & (np.fmod(whole, 2) == 1))
    v = np.ldexp(whole, q)
    return bits_of(np.where(neg, -v, v), code)


def formula(kind: str, xs: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The plain fp32 formula, as torch computes it."""
    x = [torch.from_numpy(v.astype(np.float32)) for v in xs]
    a = float(np.float32(alpha)) if kind in ("apply", "fused") else 1.0
    if kind == "convert":
        return x[0].numpy()
    if kind == "residual":
        return (x[0] - x[1]).numpy()
    d = x[0] if kind == "apply" else x[0] - x[1]
    p = d if a == 1.0 else d * a
    return (x[-1] + p).numpy()


def cast32(s: np.ndarray, code: str) -> np.ndarray:
    """torch's cast of the fp32 result; BF16 NaN is 0x7FC0 (c10's scalar cast: the
    vectorised CPU cast writes 0xFFFF instead)."""
    if code == "F32":
        return s.view(np.uint32)
    dt = torch.bfloat16 if code == "BF16" else torch.float16
    bits = torch.from_numpy(s).to(dt).view(torch.int16).numpy().view(np.uint16)
    return np.where(np.isnan(s), 0x7FC0, bits).astype(np.uint16) if code == "BF16" else bits


def reference(kind: str, out_code: str, inputs: Inputs, alpha: float = 1.0) -> np.ndarray:
    xs = [value_of(b, c) for b, c in inputs]
    finite = np.logical_and.reduce([np.isfinite(x) for x in xs])
    a = float(np.float32(alpha)) if kind in ("apply", "fused") else 1.0
    hi, lo = exact_dd(kind, [np.where(finite, x, 0.0) for x in xs], a)
    s = formula(kind, xs, alpha)
    zero = np.where(s == 0, cast32(s, out_code), 0)
    return np.where(
        ~finite, cast32(s, out_code), np.where(hi == 0, zero, round_dd(hi, lo, out_code))
    )


def assert_same(got: np.ndarray, want: np.ndarray, code: str) -> None:
    if code != "BF16":  # NaN payloads are not part of the contract for F32 / F16
        nan = np.isnan(value_of(want, code))
        assert (np.isnan(value_of(got, code)) == nan).all()
        got, want = got[~nan], want[~nan]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (
        f"{bad.size} differ, first at {bad[0]}: {got[bad[0]]:#x} != {want[bad[0]]:#x}"
    )


# ---- realistic data, every kind and dtype mix ----------------------------------------


def realistic(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = np.where(rng.random(n) < 0.5, -1.0, 1.0) * 10.0 ** rng.uniform(-3, 0, n)
    instruct = base + rng.uniform(-1e-2, 1e-2, n)
    return {"instruct": instruct, "base": base, "target": base + rng.uniform(-1e-2, 1e-2, n)}


CASES = [
    *(("fused", (c, c, c), c) for c in ("BF16", "F16", "F32")),
    *(("residual", (c, c), o) for c, o in (("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"))),
    ("residual", ("BF16", "BF16"), "F32"),
    *(("apply", (c, c), c) for c in ("BF16", "F16", "F32")),
    ("apply", ("F32", "BF16"), "BF16"),
    ("apply", ("BF16", "F16"), "F16"),
    *(("convert", (c,), o) for c, o in (("F32", "BF16"), ("BF16", "F32"), ("F32", "F16"))),
]


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("kind", "codes", "out_code"), CASES)
def test_realistic_data_matches_reference(
    kind: str, codes: tuple[str, ...], out_code: str, alpha: float
) -> None:
    data = realistic(20_003, seed=len(codes) + ALPHAS.index(alpha))
    roles = {
        "residual": ("instruct", "base"),
        "fused": ("instruct", "base", "target"),
        "apply": ("delta", "target"),
        "convert": ("instruct",),
    }[kind]
    data["delta"] = data["instruct"] - data["base"]
    inputs = [(bits_of(data[r], c), c) for r, c in zip(roles, codes, strict=True)]
    want = reference(kind, out_code, inputs, alpha)
    assert_same(run(kind, out_code, inputs, alpha), want, out_code)


def test_reference_agrees_with_rational_arithmetic() -> None:
    data = realistic(300, seed=7)
    inputs = [(bits_of(data[r], "BF16"), "BF16") for r in ("instruct", "base", "target")]
    want = reference("fused", "F16", inputs, 0.7)
    xs = [value_of(b, c) for b, c in inputs]
    rational = [exact.element_bits("fused", [x[i] for x in xs], 0.7, "F16") for i in range(300)]
    assert want.tolist() == rational


@pytest.mark.parametrize("kind", ["residual", "apply"])
def test_f32_equals_torch_where_its_formula_is_exact(kind: str) -> None:
    data = realistic(50_001, seed=3)
    second = "base" if kind == "residual" else "target"
    inputs = [(bits_of(data["instruct"], "F32"), "F32"), (bits_of(data[second], "F32"), "F32")]
    s = formula(kind, [value_of(b, c) for b, c in inputs], 1.0)
    assert_same(run(kind, "F32", inputs), s.view(np.uint32), "F32")


def test_f32_fused_equals_torch_when_the_difference_is_exact() -> None:
    data = realistic(50_001, seed=4)
    base = data["base"].astype(np.float32)
    instruct = (base * np.float32(1.001)).astype(np.float32)  # Sterbenz: exact difference
    inputs = [(instruct.view(np.uint32), "F32"), (base.view(np.uint32), "F32")]
    inputs.append((bits_of(data["target"], "F32"), "F32"))
    s = formula("fused", [value_of(b, c) for b, c in inputs], 1.0)
    assert_same(run("fused", "F32", inputs), s.view(np.uint32), "F32")


def test_bf16_equals_torch_off_midpoints() -> None:
    data = realistic(50_001, seed=5)
    inputs = [(bits_of(data[r], "BF16"), "BF16") for r in ("instruct", "base", "target")]
    s = formula("fused", [value_of(b, c) for b, c in inputs], 1.0)
    off = (s.view(np.uint32) & 0xFFFF) != 0x8000
    assert off.mean() > 0.8  # sums of BF16 values often land on exact midpoints
    assert_same(run("fused", "BF16", inputs)[off], cast32(s, "BF16")[off], "BF16")


# ---- adversarial elements ----------------------------------------------------------


def bf(*values: float) -> np.ndarray:
    return bits_of(np.array(values), "BF16")


def f32(*values: float) -> np.ndarray:
    return bits_of(np.array(values), "F32")


def test_bf16_ties_follow_the_exact_value() -> None:
    e = 2.0**-30
    # 1 + 2^-8 (+ or - 2^-30): the fp32 sum is the midpoint, the exact sum is not.
    x0 = bf(2**-8, 2**-8, 2**-8, 2**-8, 2**-8, 2**-8)
    x1 = bf(-e, e, 0, -e, e, 0)
    x2 = bf(1, 1, 1, 1 + 2**-7, 1 + 2**-7, 1 + 2**-7)
    got = run("fused", "BF16", [(x0, "BF16"), (x1, "BF16"), (x2, "BF16")])
    # above -> up; below -> down; an exact tie -> even
    assert got.tolist() == [0x3F81, 0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F82]


@pytest.mark.parametrize("alpha", [0.5, -0.5, 2.0])
def test_exact_ties_with_power_of_two_alpha(alpha: float) -> None:
    rng = np.random.default_rng(11)
    target = bf(*(rng.choice([1.0, 1 + 2**-7, -3.0, 0.25]) for _ in range(4001)))
    steps = rng.integers(-8, 8, 4001) * 2.0**-10 / alpha
    inputs = [(bf(*steps), "BF16"), (bf(*np.zeros(4001)), "BF16"), (target, "BF16")]
    assert_same(
        run("fused", "BF16", inputs, alpha), reference("fused", "BF16", inputs, alpha), "BF16"
    )


def test_fp32_residual_onto_bf16_and_f16_ties() -> None:
    res = f32(2**-8 + 2**-30, 2**-8 - 2**-30, 2**-8, 2**-11 + 2**-30, 2**-11)
    tgt = bf(1, 1, 1, 1, 1)
    got = run("apply", "BF16", [(res, "F32"), (tgt, "BF16")])
    assert got[:3].tolist() == [0x3F81, 0x3F80, 0x3F80]
    got = run("apply", "F16", [(res, "F32"), (bits_of(np.ones(5), "F16"), "F16")])
    assert got[3:].tolist() == [0x3C01, 0x3C00]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tie_decided_below_double_precision(sign: float) -> None:
    # a*d = 2^-17 - 2^-63 (a = 1 - 2^-23, d = 2^-17 + 2^-40): the double sum rounds onto a
    # BF16 midpoint, only its rounding error says the exact value is below / above it.
    k = 2.0**-40
    x0, x1 = bf(sign * 2**23 * k, sign * 2**23 * k), bf(-sign * k, -sign * k)
    x2 = bf(sign * 2**31 * k * (1 + 2**-7), -sign * 2**31 * k * (1 + 3 * 2**-7))
    got = check_exact("fused", "BF16", [(x0, "BF16"), (x1, "BF16"), (x2, "BF16")], 1 - 2**-23)
    assert (got == x2).all()  # the naive tie-to-even would move both to the even neighbour


def test_signed_zeros() -> None:
    z, big = [0.0, -0.0], 2.0**127
    rows = [(a, b, c) for a in z for b in z for c in z] + [(big, -big, -big), (-big, big, big)]
    cols = [np.array(c) for c in zip(*rows, strict=True)]
    for code, out in (("BF16", "BF16"), ("F32", "F32"), ("F32", "BF16"), ("BF16", "F16")):
        for alpha in (1.0, 0.5):
            for kind, n in (("fused", 3), ("apply", 2), ("residual", 2), ("convert", 1)):
                check_exact(kind, out, [(bits_of(c, code), code) for c in cols[:n]], alpha)


def check_exact(kind: str, out_code: str, inputs: Inputs, alpha: float) -> np.ndarray:
    got = run(kind, out_code, inputs, alpha)
    xs = [value_of(b, c) for b, c in inputs]
    for i in range(len(got)):
        want = exact.element_bits(kind, [float(x[i]) for x in xs], alpha, out_code)
        assert_same(got[i : i + 1], np.array([want], UINT[out_code]), out_code)
    return got


@pytest.mark.parametrize("alpha", ALPHAS)
def test_large_exponent_gaps(alpha: float) -> None:
    rng = np.random.default_rng(12)
    big = (1 + rng.integers(0, 128, 600) / 128) * np.where(rng.random(600) < 0.5, -1, 1)
    tiny = big * 2.0 ** rng.integers(-60, -16, 600) * rng.uniform(0.5, 1, 600)
    target = big * rng.uniform(-1, 1, 600)
    inputs = [(bf(*big), "BF16"), (bf(*tiny), "BF16"), (bf(*target), "BF16")]
    check_exact("fused", "BF16", inputs, alpha)
    wide = [(f32(*tiny), "F32"), (f32(*(tiny * 2.0**-70)), "F32"), (f32(*big), "F32")]
    check_exact("fused", "BF16", wide, alpha)


@pytest.mark.parametrize("alpha", [0.7, -0.5, 3.0])
def test_cancellation(alpha: float) -> None:
    rng = np.random.default_rng(13)
    d = bits_of(rng.uniform(-1e-2, 1e-2, 2000), "BF16")
    a = float(np.float32(alpha))
    target = bits_of(-a * value_of(d, "BF16") * (1 + rng.integers(-2, 3, 2000) * 2.0**-9), "BF16")
    zero = bf(*np.zeros(2000))
    for out in ("BF16", "F16", "F32"):
        check_exact("fused", out, [(d, "BF16"), (zero, "BF16"), (target, "BF16")], alpha)


def test_f16_subnormal_results_and_overflow() -> None:
    rng = np.random.default_rng(14)
    res = f32(*rng.uniform(-(2**-14), 2**-14, 3000))
    tgt = bits_of(rng.uniform(-(2**-14), 2**-14, 3000), "F16")
    got = check_exact("apply", "F16", [(res, "F32"), (tgt, "F16")], 0.7)
    assert ((got & 0x7C00) == 0).mean() > 0.5  # mostly subnormal results
    res = f32(16, 15.99, 32, -16, 2**-10)
    tgt = bits_of(np.array([65504, 65504, 65504, -65504, 65504]), "F16")
    got = run("apply", "F16", [(res, "F32"), (tgt, "F16")])
    assert got.tolist() == [0x7C00, 0x7BFF, 0x7C00, 0xFC00, 0x7BFF]


def test_nan_and_inf_inputs_give_the_fp32_formula() -> None:
    inf, nan = float("inf"), float("nan")
    x0 = [nan, inf, inf, 1.0, 1.0, -inf, 1e38, 2.0, 0.0]
    x1 = [1.0, inf, 1.0, nan, 1.0, 1.0, -1e38, 1.0, -0.0]
    x2 = [1.0, 1.0, -inf, 1.0, nan, inf, 1.0, inf, -0.0]
    for code, out in (("BF16", "BF16"), ("F32", "F32"), ("F32", "F16"), ("BF16", "F32")):
        for alpha in (1.0, 0.7):
            inputs = [(bits_of(np.array(x), code), code) for x in (x0, x1, x2)]
            want = reference("fused", out, inputs, alpha)
            assert_same(run("fused", out, inputs, alpha), want, out)
            check_exact("fused", out, inputs, alpha)


@pytest.mark.parametrize("n", [0, 1, 15, 17, 255, 257, 1031])
@pytest.mark.parametrize("out_code", ["BF16", "F16"])
def test_odd_and_zero_lengths(n: int, out_code: str) -> None:
    data = realistic(n, seed=n)
    inputs = [(bits_of(data[r], "BF16"), "BF16") for r in ("instruct", "base", "target")]
    assert_same(
        run("fused", out_code, inputs, 0.7), reference("fused", out_code, inputs, 0.7), out_code
    )


def test_read_only_inputs(tmp_path: Path) -> None:
    data = realistic(4099, seed=9)
    raw = [bits_of(data[r], "BF16").tobytes() for r in ("instruct", "base", "target")]
    (tmp_path / "t.bin").write_bytes(raw[2])
    out = bytearray(len(raw[0]))
    with (
        open(tmp_path / "t.bin", "rb") as fh,
        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
        inputs = [
            (memoryview(raw[0]), "BF16"),
            (memoryview(raw[1]), "BF16"),
            (memoryview(m), "BF16"),
        ]
        native.combine("fused", memoryview(out), "BF16", inputs, 0.7)
        del inputs
    want = reference("fused", "BF16", [(np.frombuffer(r, np.uint16), "BF16") for r in raw], 0.7)
    assert_same(np.frombuffer(out, np.uint16), want, "BF16")


# ---- properties, the hard path, stats, threads, API ------------------------------------

finite_bf16 = st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7F80) != 0x7F80)
any_f32 = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(finite_bf16, finite_bf16, st.integers(0, 0xFFFF)), min_size=1, max_size=40),
    st.sampled_from([1.0, 0.7, -0.5, 2.0, 0.0, 1e-30, 3e9]),
    st.sampled_from(["fused", "apply", "residual"]),
    st.sampled_from(["BF16", "F16", "F32"]),
)
def test_property_bf16_inputs(
    rows: list[tuple[int, int, int]], alpha: float, kind: str, out_code: str
) -> None:
    cols = [np.array(c, np.uint16) for c in zip(*rows, strict=True)]
    inputs = [(c, "BF16") for c in cols[: {"fused": 3, "apply": 2, "residual": 2}[kind]]]
    check_exact(kind, out_code, inputs, alpha)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(any_f32, any_f32, any_f32), min_size=1, max_size=20))
def test_property_any_f32_inputs(rows: list[tuple[int, int, int]]) -> None:
    cols = [np.array(c, np.uint32) for c in zip(*rows, strict=True)]
    check_exact("fused", "BF16", [(c, "F32") for c in cols], 0.7)


def spy_hard(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., None] = native._fix_hard

    def spy(*args: object) -> None:
        calls.append(len(args[-1]))  # type: ignore[arg-type]
        real(*args)

    monkeypatch.setattr(native, "_fix_hard", spy)
    return calls


@pytest.mark.parametrize("code", ["F32", "BF16", "F16"])
def test_round_bits_matches_numpy_over_the_whole_range(code: str) -> None:
    rng = np.random.default_rng(18)
    prec, emin = PREC_EMIN[code]
    m = rng.uniform(1, 2, 4000)
    m[::3] = (np.floor(m[::3] * 2.0 ** (prec - 1)) + 0.5) / 2.0 ** (prec - 1)  # exact ties
    top = 127 if code == "BF16" else 1 - emin + 3  # past the overflow threshold
    v = m * 2.0 ** rng.integers(emin - prec - 3, top, 4000)
    v *= np.where(rng.random(4000) < 0.5, -1, 1)
    if code == "BF16":  # ml_dtypes rounds float32 inputs once; add the overflow boundary
        edge = np.array([0x7F7F8000, 0x7F7F7FFF, 0x7F7FFFFF, 0xFF7F8000], np.uint32)
        v = np.concatenate([v.astype(np.float32), edge.view(np.float32)]).astype(np.float64)
    want = bits_of(v, code).tolist()
    assert [exact.round_bits(Fraction(x), code) for x in v] == want


@pytest.mark.parametrize("capacity", [1, 7, 65536])
def test_hard_elements_beyond_capacity(monkeypatch: pytest.MonkeyPatch, capacity: int) -> None:
    monkeypatch.setattr(native, "HARD_CAPACITY", capacity)
    calls = spy_hard(monkeypatch)
    rng = np.random.default_rng(15)
    sign = np.where(rng.random(300) < 0.5, -1.0, 1.0)
    # target on a BF16 midpoint, the rest 60 and 120 binades below: only rationals decide.
    x0, x1 = f32(*(sign * 2.0**-60)), f32(*(rng.uniform(1, 2, 300) * 2.0**-120))
    x2 = f32(*np.full(300, 1 + 2**-8))
    got = run("fused", "BF16", [(x0, "F32"), (x1, "F32"), (x2, "F32")], 1.0)
    assert got.tolist() == np.where(sign > 0, 0x3F81, 0x3F80).tolist()
    assert sum(calls) == 300 and len(calls) >= 300 // capacity


def test_stats_are_the_fp32_formulas_and_repeatable() -> None:
    data = realistic(100_003, seed=16)
    inputs = [(bits_of(data[r], "BF16"), "BF16") for r in ("instruct", "base", "target")]
    views = [(b.data.cast("B"), c) for b, c in inputs]
    out = memoryview(bytearray(2 * 100_003))
    for alpha, out_code in ((1.0, "BF16"), (0.7, "BF16"), (0.7, "F32")):
        out = memoryview(bytearray(100_003 * (4 if out_code == "F32" else 2)))
        got = native.combine("fused", out, out_code, views, alpha, want_stats=True)
        s = formula("fused", [value_of(b, c) for b, c in inputs], alpha).astype(np.float64)
        assert got[0] == pytest.approx(float((s * s).sum()), rel=1e-12)
        assert got[1] == float(np.abs(s).max())
        assert native.combine("fused", out, out_code, views, alpha, want_stats=True) == got
    assert native.combine("fused", out, "F32", views, 0.7) == (0.0, 0.0)


def test_threads_share_the_kernel() -> None:
    data = realistic(400_000, seed=17)
    inputs = [(bits_of(data[r], "BF16"), "BF16") for r in ("instruct", "base", "target")]
    whole = run("fused", "BF16", inputs, 0.7)
    out = np.zeros(400_000, np.uint16)

    def part(lo: int, hi: int) -> None:
        views = [(b[lo:hi].data.cast("B"), c) for b, c in inputs]
        native.combine("fused", out[lo:hi].data.cast("B"), "BF16", views, 0.7)

    threads = [
        threading.Thread(target=part, args=(k * 100_000, (k + 1) * 100_000)) for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (out == whole).all()


def test_bad_calls_say_what_is_wrong() -> None:
    buf = memoryview(bytearray(8))
    with pytest.raises(ValueError, match="unknown kind 'sum'"):
        native.combine("sum", buf, "BF16", [(buf, "BF16")])
    with pytest.raises(ValueError, match="unknown dtype code 'F64'"):
        native.combine("convert", buf, "F64", [(buf, "BF16")])
    with pytest.raises(ValueError, match="takes 3 inputs"):
        native.combine("fused", buf, "BF16", [(buf, "BF16")])
    with pytest.raises(ValueError, match="base: 6 bytes"):
        native.combine("residual", buf, "BF16", [(buf, "BF16"), (buf[:6], "BF16")])
    with pytest.raises(ValueError, match="C-contiguous"):
        native.combine("convert", buf[:4], "BF16", [(memoryview(bytearray(8))[::2], "BF16")])
    with pytest.raises(ValueError, match="writable"):
        native.combine("convert", memoryview(bytes(8)), "BF16", [(buf, "BF16")])
    with pytest.raises(ValueError, match="alpha"):
        native.combine("apply", buf, "BF16", [(buf, "BF16"), (buf, "BF16")], float("nan"))


def _load_report(prelude: str, first: str) -> tuple[str, str]:
    """In a fresh interpreter: ``prelude``, then import the kernel's wrapper and print
    ``first`` and its load error (what :func:`native.load_error` tells a user)."""
    code = (
        f"{prelude}from app.residuals import native\nprint({first})\nprint(native.load_error())\n"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line, message = res.stdout.splitlines()[:2]
    return line, message


def test_imports_nothing_heavy_and_explains_a_missing_build() -> None:
    prelude = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'app.residuals._native': raise ImportError('not built')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    first, message = _load_report(
        prelude, "native.available(), [m for m in ('torch', 'numpy') if m in sys.modules]"
    )
    assert first == "False []"
    assert "install a C compiler" in message and "reinstall realign" in message


def test_a_library_built_from_older_sources_is_reported_stale() -> None:
    """A kernel built before a codec function existed (a checkout pulled, the extension
    not rebuilt) is refused at load with what to do, not at the first exact pack."""
    # _CODEC is read at the first load, which the print below triggers
    prelude = "import app.residuals.native as n\nn._CODEC += ('realign_from_a_later_version',)\n"
    first, message = _load_report(prelude, "native.available()")
    assert first == "False"
    assert "realign_from_a_later_version" in message and "is stale" in message
