"""Apply-time merge methods that transform residuals: TIES (trim, elect sign, disjoint
mean) and DARE (drop at random, rescale), and their parameters.

Every function takes fp32 1-D tensors (one tensor of the model, one per residual) and
returns the fp32 delta that is then applied as ``target + alpha * delta`` with one
rounding. The math is defined operation by operation in fp32 so that an independent
reference (the tests' numpy one) gives the same bits:

- TIES (Yadav et al. 2023): each residual keeps its ``k = max(1, floor(density * n))``
  largest magnitudes (ties at the threshold broken by lower flat index), is scaled by
  its weight, the sign of the (in-order fp32) sum of the scaled residuals is elected per
  element, and the delta is ``sum(w_i * t_i) / sum(w_i)`` over the residuals whose
  nonzero value has the elected sign (the sum alone where the weights sum to 0; 0 where
  no residual agrees, or where the elected sum is 0).
- DARE (Yu et al. 2023): element ``j`` of residual ``i`` is kept where ``u_j >=
  fl32(drop_rate)`` and scaled by ``fl32(1 / (1 - drop_rate))``; ``u`` is the top 24
  bits of the ``j``-th output of Philox-4x64 keyed by ``sha256("realign.dare", seed, i,
  tensor name)``, over 2**24. The stream depends on nothing else (not the shard layout,
  the worker count or the order tensors are visited in). Residuals are then summed with
  their weights, in order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from app.core.errors import InvalidParameterError
from app.residuals.exact import to_f32

if TYPE_CHECKING:
    import torch

Params = dict[str, float | int]
_RNG_CHUNK = 1 << 22  # elements of random bits drawn at a time


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: its type, default and range (``lo`` < or <= value
    < or <= ``hi``, as ``lo_open`` / ``hi_open`` say)."""

    kind: type[int] | type[float]
    default: float | int
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    help: str

    def describe(self, name: str) -> str:
        if self.kind is int:
            bounds = f"a whole number from {int(self.lo)} to {int(self.hi)}"
        else:
            lo, hi = ("<" if self.lo_open else "<="), ("<" if self.hi_open else "<=")
            bounds = f"{self.lo:g} {lo} {name} {hi} {self.hi:g}"
        return f"{name} ({self.help}; {bounds}, default {self.default:g})"


def _number(method: str, name: str, value: object, spec: ParamSpec) -> float | int:
    text = f"{method}: {name} must be a number, not {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameterError(text)
    if spec.kind is int:
        if not float(value).is_integer():
            raise InvalidParameterError(f"{method}: {name} must be a whole number, not {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise InvalidParameterError(text)
    return float(value)


def check_params(method: str, raw: Mapping[str, object], specs: Mapping[str, ParamSpec]) -> Params:
    """``raw`` checked against ``specs``, with the defaults filled in.

    Raises:
        InvalidParameterError: a parameter ``specs`` lacks, or a value of the wrong type
            or out of range; the message lists what the method takes.
    """
    takes = "; ".join(s.describe(n) for n, s in specs.items()) or "no parameters"
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise InvalidParameterError(
            f"{method} has no parameter {unknown[0]!r}; {method} takes {takes}"
        )
    out: Params = {}
    for name, spec in specs.items():
        value = _number(method, name, raw.get(name, spec.default), spec)
        low_ok = value > spec.lo if spec.lo_open else value >= spec.lo
        high_ok = value < spec.hi if spec.hi_open else value <= spec.hi
        if not (low_ok and high_ok):
            raise InvalidParameterError(f"{method}: {name}={value!r} is out of range; {takes}")
        out[name] = value
    return out


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum(fl32(w_i * d_i))`` in fp32, in order (a weight of 1 leaves ``d_i`` exact)."""
    total: torch.Tensor | None = None
    for d, w in zip(deltas, weights, strict=True):
        term = d if w == 1.0 else d * to_f32(w)
        total = term if total is None else total + term  # never changed in place
    assert total is not None, "no residuals"
    return total


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``max(1, floor(density * n))`` largest magnitudes set
    to 0 (equal magnitudes at the threshold: the lower flat indices are kept)."""
    import torch

    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    k = max(1, int(density * n))
    mag = delta.abs()
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > threshold
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(mag == threshold).flatten()[:need]] = True
    return torch.where(keep, delta, 0.0)


def ties_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float
) -> torch.Tensor:
    """TIES-Merging of one tensor's residuals (see the module docstring)."""
    import torch

    scaled = weighted_terms([trim(d, density) for d in deltas], weights)
    elected = torch.sign(weighted_sum([t for t, _ in scaled], [1.0] * len(scaled)))
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected)
    for term, w in scaled:
        agree = (torch.sign(term) == elected) & (term != 0)
        num = num + torch.where(agree, term, 0.0)
        den = den + torch.where(agree, w, 0.0)
    return num / torch.where(den == 0, 1.0, den)  # den == 0: no residual agrees (num == 0)


def weighted_terms(
    deltas: Sequence[torch.Tensor], weights: Sequence[float]
) -> list[tuple[torch.Tensor, float]]:
    """``(fl32(w * d), fl32(w))`` per residual."""
    return [
        (d if w == 1.0 else d * to_f32(w), to_f32(w)) for d, w in zip(deltas, weights, strict=True)
    ]


def dare_key(seed: int, index: int, name: str) -> int:
    """The 128-bit Philox key of residual ``index``'s stream for tensor ``name``."""
    digest = hashlib.sha256(f"realign.dare\0{seed}\0{index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def uniform(seed: int, index: int, name: str, n: int) -> torch.Tensor:
    """``n`` fp32 values in [0, 1), multiples of 2**-24, of the stream of ``(seed,
    index, name)``, on the CPU."""
    import numpy as np
    import torch

    gen = np.random.Philox(key=dare_key(seed, index, name))
    out = torch.empty(n, dtype=torch.float32)
    dst = out.numpy()
    for lo in range(0, n, _RNG_CHUNK):
        hi = min(n, lo + _RNG_CHUNK)
        bits = gen.random_raw(hi - lo) >> np.uint64(40)
        dst[lo:hi] = bits.astype(np.float32) * np.float32(2.0**-24)  # exact
    return out


def dare_drop(
    delta: torch.Tensor, drop_rate: float, seed: int, index: int, name: str
) -> torch.Tensor:
    """DARE of one residual tensor: drop with probability ``drop_rate``, rescale the rest."""
    import torch

    if drop_rate == 0.0:
        return delta
    u = uniform(seed, index, name, delta.numel()).to(delta.device)
    keep = u >= torch.tensor(to_f32(drop_rate), dtype=torch.float32, device=delta.device)
    scale = to_f32(1.0 / (1.0 - drop_rate))
    return torch.where(keep, delta * scale, 0.0)


class _ResidualOnly:
    """Residual packs of apply-time methods are task-arithmetic packs: the element-wise
    kinds are task arithmetic's; merging runs on the per-tensor path only."""

    name = ""
    native = False
    per_tensor = True

    def combine(
        self, kind: str, xs: Sequence[torch.Tensor], alpha: float, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if kind not in ("residual", "convert"):
            raise ValueError(
                f"{self.name} transforms whole residual tensors: it runs on the per-tensor "
                f"path (app.residuals.multi), not as an element-wise {kind!r} step"
            )
        from app.residuals.torch_math import combine

        return combine(kind, xs, alpha, out_dtype)


class Ties(_ResidualOnly):
    """TIES-Merging: trim to the top ``density`` by magnitude per tensor, elect signs,
    disjoint (weighted) mean."""

    name = "ties"
    description = "new = target + alpha * disjoint_mean(elect(trim(R_i, density)))"
    PARAMS: ClassVar[Mapping[str, ParamSpec]] = {
        "density": ParamSpec(
            float, 0.2, 0.0, 1.0, True, False, "fraction of each residual tensor kept, by magnitude"
        )
    }

    def check_params(self, params: Mapping[str, object]) -> Params:
        return check_params(self.name, params, self.PARAMS)

    def merge(
        self, deltas: Sequence[torch.Tensor], weights: Sequence[float], params: Params, name: str
    ) -> torch.Tensor:
        return ties_merge(deltas, weights, float(params["density"]))


class Dare(_ResidualOnly):
    """DARE: drop residual elements at random (seeded per tensor), rescale the kept
    by ``1 / (1 - drop_rate)``, then the weighted sum."""

    name = "dare"
    description = "new = target + alpha * sum(w_i * drop(R_i, drop_rate) / (1 - drop_rate))"
    PARAMS: ClassVar[Mapping[str, ParamSpec]] = {
        "drop_rate": ParamSpec(
            float, 0.9, 0.0, 1.0, False, True, "probability that a residual element is dropped"
        ),
        "seed": ParamSpec(int, 0, 0, 2**63 - 1, False, False, "seed of the drop pattern"),
    }

    def check_params(self, params: Mapping[str, object]) -> Params:
        return check_params(self.name, params, self.PARAMS)

    def merge(
        self, deltas: Sequence[torch.Tensor], weights: Sequence[float], params: Params, name: str
    ) -> torch.Tensor:
        p, seed = float(params["drop_rate"]), int(params["seed"])
        dropped = [dare_drop(d, p, seed, i, name) for i, d in enumerate(deltas)]
        return weighted_sum(dropped, weights)
