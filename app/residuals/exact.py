"""Exact, correctly rounded evaluation of single merge elements (stdlib only).

The native kernel proves most elements fast; the few it cannot (huge exponent gaps between
the inputs) are evaluated here with rational arithmetic. The rules are the kernel's contract:

* the exact value ``X`` of the kind (see :func:`exact_value`), ``alpha`` rounded once to fp32,
  is rounded once to the output format, nearest-even, with subnormals and overflow to inf;
* an exact zero takes the sign of the plain fp32 formula's result when that is a zero too,
  else it is +0;
* a NaN or inf input gives the plain fp32 formula (:func:`fp32_formula`), cast to the output
  (BF16 NaN is ``0x7FC0`` like c10::BFloat16; torch's vectorised CPU cast writes ``0xFFFF``
  instead. F16 NaN is quieted with its payload kept, as the hardware cast does); the sign
  and payload of an F32 or F16 NaN are not part of the contract (backends may differ there).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: significand precision (with the hidden bit) and range."""

    precision: int
    emin: int
    emax: int

    @property
    def exp_bits(self) -> int:
        """Width of the exponent field."""
        return self.emax.bit_length() + 1


FORMATS: dict[str, FloatFormat] = {
    "F32": FloatFormat(precision=24, emin=-126, emax=127),
    "BF16": FloatFormat(precision=8, emin=-126, emax=127),
    "F16": FloatFormat(precision=11, emin=-14, emax=15),
}
KINDS = ("residual", "apply", "fused", "convert")
_ARITY = {"residual": 2, "apply": 2, "fused": 3, "convert": 1}


def _format(code: str) -> FloatFormat:
    try:
        return FORMATS[code]
    except KeyError:
        raise ValueError(f"unknown dtype code {code!r}: expected one of F32, BF16, F16") from None


def round_bits(value: Fraction, out_code: str) -> int:
    """Round ``value`` once to ``out_code``, nearest-even, and return the bit pattern.

    Args:
        value: the exact value; zero gives +0 (a rational has no signed zero).
        out_code: ``"F32"``, ``"BF16"`` or ``"F16"``.

    Returns:
        The output's bits: subnormals where the value is tiny (a tiny negative value keeps
        its sign as -0), infinity where it rounds beyond the largest finite number.

    Raises:
        ValueError: unknown ``out_code``.
    """
    fmt = _format(out_code)
    mant_bits = fmt.precision - 1
    sign = (1 << (mant_bits + fmt.exp_bits)) if value < 0 else 0
    mag = abs(value)
    if mag == 0:
        return sign
    num, den = mag.numerator, mag.denominator
    exp = num.bit_length() - den.bit_length()
    if Fraction(2) ** exp > mag:
        exp -= 1
    quantum = max(exp, fmt.emin) - mant_bits
    scaled = mag / Fraction(2) ** quantum
    whole, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest > scaled.denominator or (2 * rest == scaled.denominator and whole & 1):
        whole += 1
    if whole >> fmt.precision:  # the rounding carried into the next binade
        whole >>= 1
        quantum += 1
    if not whole >> mant_bits:  # subnormal: exponent field 0
        return sign | whole
    exponent = quantum + mant_bits
    if exponent > fmt.emax:
        return sign | (((1 << fmt.exp_bits) - 1) << mant_bits)
    return sign | ((exponent + fmt.emax) << mant_bits) | (whole - (1 << mant_bits))


def to_f32(x: float) -> float:
    """``x`` rounded once to fp32 (nearest-even; inf beyond the range), as a Python float."""
    try:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])
    except OverflowError:  # rounds beyond FLT_MAX
        return math.copysign(math.inf, x)


def decode(bits: int, code: str) -> float:
    """The value of one element's bit pattern (exact: every format fits in a double)."""
    if code == "F32":
        return float(struct.unpack("<f", bits.to_bytes(4, "little"))[0])
    if code == "BF16":
        return float(struct.unpack("<f", (bits << 16).to_bytes(4, "little"))[0])
    if code == "F16":
        return float(struct.unpack("<e", bits.to_bytes(2, "little"))[0])
    _format(code)
    raise AssertionError(code)


def _check(kind: str, xs: Sequence[float]) -> None:
    if kind not in _ARITY:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    if len(xs) != _ARITY[kind]:
        raise ValueError(f"{kind} takes {_ARITY[kind]} inputs, got {len(xs)}")


def exact_value(kind: str, xs: Sequence[float], alpha: float) -> Fraction:
    """The exact real value of one element (finite inputs).

    Args:
        kind: ``residual`` (instruct, base): ``x0 - x1``; ``apply`` (residual, target):
            ``x1 + a*x0``; ``fused`` (instruct, base, target): ``x2 + a*(x0 - x1)``;
            ``convert`` (x,): ``x0``.
        xs: the decoded inputs.
        alpha: the scale; ``a`` is ``alpha`` rounded once to fp32.

    Returns:
        ``X`` as a rational, no rounding anywhere.

    Raises:
        ValueError: unknown kind, wrong number of inputs, or a non-finite input or alpha.
    """
    _check(kind, xs)
    if not all(math.isfinite(x) for x in (*xs, alpha)):
        raise ValueError(f"{kind}: inputs {list(xs)} and alpha {alpha} must be finite")
    x = [Fraction(v) for v in xs]
    a = Fraction(to_f32(alpha))
    if kind == "residual":
        return x[0] - x[1]
    if kind == "apply":
        return x[1] + a * x[0]
    if kind == "fused":
        return x[2] + a * (x[0] - x[1])
    return x[0]


def _f32_round(exact: Fraction, negative_zero: bool) -> float:
    if exact == 0:
        return -0.0 if negative_zero else 0.0
    return decode(round_bits(exact, "F32"), "F32")


def _f32_add(x: float, y: float) -> float:
    """IEEE fp32 ``x + y`` of fp32 values; an exact zero is -0 only for (-0) + (-0)."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return x + y  # inf and NaN propagate as in fp32
    both_negative = math.copysign(1.0, x) < 0 and math.copysign(1.0, y) < 0
    return _f32_round(Fraction(x) + Fraction(y), both_negative)


def _f32_mul(x: float, y: float) -> float:
    """IEEE fp32 ``x * y`` of fp32 values; a zero product has the product of the signs."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return x * y
    return _f32_round(Fraction(x) * Fraction(y), math.copysign(1.0, x) * math.copysign(1.0, y) < 0)


def fp32_formula(kind: str, xs: Sequence[float], alpha: float) -> float:
    """What plain fp32 arithmetic (torch today) computes for one element.

    ``residual``: ``fl(x0 - x1)``; ``apply``: ``fl(x1 + fl(a*x0))``; ``fused``:
    ``fl(x2 + fl(a*fl(x0 - x1)))``; ``convert``: ``x0``; the multiply is skipped when
    ``a == 1``. NaN and inf follow IEEE rules (NaN payloads are not modelled).
    """
    _check(kind, xs)
    a = to_f32(alpha)
    if kind == "convert":
        return xs[0]
    if kind == "residual":
        return _f32_add(xs[0], -xs[1])
    d = xs[0] if kind == "apply" else _f32_add(xs[0], -xs[1])
    p = d if a == 1.0 else _f32_mul(a, d)
    return _f32_add(xs[2] if kind == "fused" else xs[1], p)


def float_bits(x: float, out_code: str) -> int:
    """Cast an fp32 value (or inf / NaN) to ``out_code`` bits the way the kernel does."""
    fmt = _format(out_code)
    top = 1 << (fmt.precision - 1 + fmt.exp_bits)
    sign = top if math.copysign(1.0, x) < 0 else 0
    if math.isnan(x):
        f32 = int.from_bytes(struct.pack("<f", x), "little")
        if out_code == "F32":
            return f32
        if out_code == "BF16":
            return 0x7FC0
        return ((f32 >> 16) & 0x8000) | 0x7E00 | ((f32 >> 13) & 0x3FF)
    if math.isinf(x):
        return sign | ((1 << fmt.exp_bits) - 1) << (fmt.precision - 1)
    return round_bits(Fraction(x), out_code) | sign


def element_bits(kind: str, xs: Sequence[float], alpha: float, out_code: str) -> int:
    """The output bits of one element under the full contract (see the module docstring).

    Args:
        kind: ``residual``, ``apply``, ``fused`` or ``convert``.
        xs: the decoded inputs, in the kind's order.
        alpha: the scale (ignored by ``residual`` and ``convert``).
        out_code: ``"F32"``, ``"BF16"`` or ``"F16"``.

    Returns:
        The bit pattern to store.

    Raises:
        ValueError: unknown kind or code, or wrong number of inputs.
    """
    _check(kind, xs)
    if kind in ("residual", "convert"):
        alpha = 1.0
    if not all(math.isfinite(x) for x in xs):
        return float_bits(fp32_formula(kind, xs, alpha), out_code)
    value = exact_value(kind, xs, alpha)
    if value == 0:
        s = fp32_formula(kind, xs, alpha)
        return float_bits(s, out_code) if s == 0 else 0
    return round_bits(value, out_code)
