"""Tensor element types, named as safetensors names them, without importing torch.

The merge path (checkpoint headers, planning, the native kernel, shard writing)
only needs an element type's code and size; torch is imported by the backends
and engines that hold tensors, so ``realign merge`` starts without paying for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One element type.

    Args:
        code: the safetensors header name (``BF16``).
        name: the torch / manifest name (``bfloat16``).
        itemsize: bytes per element.
        is_floating_point: whether merges combine it (integers and bools are copied).
    """

    code: str
    name: str
    itemsize: int
    is_floating_point: bool

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        import torch

        dtype: torch.dtype = getattr(torch, self.name)
        return dtype

    def __str__(self) -> str:
        return self.name


_ALL = [
    DType("BF16", "bfloat16", 2, True),
    DType("F16", "float16", 2, True),
    DType("F32", "float32", 4, True),
    DType("F64", "float64", 8, True),
    DType("I64", "int64", 8, False),
    DType("I32", "int32", 4, False),
    DType("I16", "int16", 2, False),
    DType("I8", "int8", 1, False),
    DType("U8", "uint8", 1, False),
    DType("BOOL", "bool", 1, False),
    DType("F8_E4M3", "float8_e4m3fn", 1, True),
    DType("F8_E5M2", "float8_e5m2", 1, True),
]
DTYPES: dict[str, DType] = {d.code: d for d in _ALL}
"""By safetensors code."""
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
"""By torch / manifest name."""

BF16, F16, F32, F64 = DTYPES["BF16"], DTYPES["F16"], DTYPES["F32"], DTYPES["F64"]

EXACT = DType("EXACT", "exact", 2, True)
"""Not an element type: the storage of exact residual packs, where each tensor keeps its
inputs' dtype as a rounded residual plus its sparse rounding error (see
:mod:`app.residuals.framed`). Its itemsize is a planning figure only."""
INT8 = DType("Q8", "int8", 1, True)
INT4 = DType("Q4", "int4", 1, True)
BITDELTA = DType("Q1", "bitdelta", 1, True)
"""Not element types either: lossy packs, opt-in, R coded in 8, 4 or 1 bit per element
with fp32 scales (see :mod:`app.residuals.lossy`). Itemsize 1 is a planning figure: an
upper bound for int4 and bitdelta, within the space check's headroom for int8."""
LOSSY_NAMES = frozenset(d.name for d in (INT8, INT4, BITDELTA))


def is_lossy(dtype: DType | str) -> bool:
    """Whether a pack format (a pseudo dtype or its name) codes R in integers with scales
    (without importing the coders)."""
    return (dtype if isinstance(dtype, str) else dtype.name) in LOSSY_NAMES and (
        isinstance(dtype, str) or dtype in (INT8, INT4, BITDELTA)
    )


PACK_DTYPES: dict[str, DType] = {
    d.name: d for d in (EXACT, DTYPES["BF16"], DTYPES["F16"], DTYPES["F32"], INT8, INT4, BITDELTA)
}
"""Storage formats of residual packs by name, the default first."""


def exact_dtype(instruct: DType, base: DType) -> DType:
    """The dtype an exact pack stores a residual tensor in: the inputs' own when they
    share a 16/32-bit float type, else fp32 (which holds both exactly)."""
    if instruct == base and instruct.code in ("BF16", "F16", "F32"):
        return instruct
    return DTYPES["F32"]


def from_torch(dtype: torch.dtype) -> DType:
    """The :class:`DType` of a torch dtype.

    Raises:
        ValueError: a dtype safetensors cannot store.
    """
    name = str(dtype).removeprefix("torch.")
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"{dtype} has no safetensors encoding") from None
