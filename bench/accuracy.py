"""How many output elements differ from the correctly rounded merge.

The reference is ``new_base + alpha * (instruct - base)`` computed in float64 (for
alpha = 1 and bf16 inputs of model-sized magnitudes this is exact) and rounded
once, to nearest-even, to the output dtype. Each candidate output is compared
bit for bit; for Realign, the elements where it differs from the plain fp32 formula
(the formula's double roundings, which Realign resolves) are counted too.

    .venv/bin/python bench/accuracy.py DATA_DIR NAME=OUT_DIR [NAME=OUT_DIR ...]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

ROWS_ELEMS = 4 * 1024 * 1024


class Reader:
    """Tensors of a model directory by name, loaded one at a time."""

    def __init__(self, directory: Path) -> None:
        self.files: dict[str, Path] = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                self.files.update({k: f for k in st.keys()})  # noqa: SIM118

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as st:
            return st.get_tensor(name)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> bfloat16 with a single round-to-nearest-even (torch would go
    through float32 and round twice)."""
    bits = x.view(torch.int64)
    lsb = (bits >> 45) & 1
    bits = (bits + ((1 << 44) - 1) + lsb) & -(1 << 45)
    return bits.view(torch.float64).float().bfloat16()  # both casts now exact


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 unit in the last place at each value (8 significant bits)."""
    _, exp = torch.frexp(x)
    exp = torch.where(x == 0, -125, exp)  # frexp(0) has exponent 0; use the smallest
    return torch.ldexp(torch.ones_like(x), (exp - 8).clamp(min=-133))


@dataclass
class Tally:
    """Elements that differ from the reference, and the error against the exact value."""

    off: int = 0
    max_ulp: float = 0.0  # largest error in units in the last place of the exact value
    err_sq: float = 0.0  # sum of squared errors against the exact (float64) result
    worst: str = ""

    def add(
        self, got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor | None, name: str
    ) -> None:
        self.off += int((got.view(torch.int16) != want.view(torch.int16)).sum())
        if exact is None:
            return
        err = got.double() - exact
        self.err_sq += float(torch.dot(err.flatten(), err.flatten()))
        top = float((err.abs() / ulp(exact)).max()) if err.numel() else 0.0
        if top > self.max_ulp:
            self.max_ulp, self.worst = top, name


@dataclass
class Report:
    elements: int = 0
    residual_sq: float = 0.0  # sum of squares of instruct - base, the scale of the change
    tallies: dict[str, Tally] = field(default_factory=dict)


def _row_chunks(t: torch.Tensor) -> Iterator[slice]:
    rows = t.shape[0] if t.dim() else 1
    step = max(1, ROWS_ELEMS // max(1, t.numel() // max(1, rows)))
    for r in range(0, rows, step):
        yield slice(r, min(rows, r + step))


def compare(
    data: Path, outputs: dict[str, Path], alpha: float = 1.0, formula: tuple[str, ...] = ()
) -> Report:
    """Count, per output, elements that differ from the correctly rounded result.

    Also tallies ``fp32-formula`` (the fp32 formula itself against that reference)
    and, for the outputs named in ``formula``, their differences from the fp32 formula.
    """
    inputs = {k: Reader(data / k) for k in ("instruct", "base", "new_base")}
    outs = {k: Reader(v) for k, v in outputs.items()}
    names = [
        "correctly rounded",
        *outputs,
        "fp32-formula",
        *(f"{k} vs fp32 formula" for k in formula),
    ]
    report = Report(tallies={k: Tally() for k in names})
    for name in inputs["base"].files:
        i, b, t = (inputs[k].get(name) for k in ("instruct", "base", "new_base"))
        got = {k: r.get(name) for k, r in outs.items()}
        report.elements += t.numel()
        for rows in _row_chunks(t):
            ii, bb, tt = i[rows], b[rows], t[rows]
            delta = ii.double() - bb.double()
            report.residual_sq += float(torch.dot(delta.flatten(), delta.flatten()))
            exact = tt.double() + delta * alpha
            want = round_bf16(exact)
            fp32 = ((ii.float() - bb.float()) * alpha + tt.float()).bfloat16()
            report.tallies["correctly rounded"].add(want, want, exact, name)
            report.tallies["fp32-formula"].add(fp32, want, exact, name)
            for k, g in got.items():
                report.tallies[k].add(g[rows].bfloat16(), want, exact, name)
                if k in formula:
                    report.tallies[f"{k} vs fp32 formula"].add(g[rows], fp32, None, name)
    return report


def main() -> None:
    data = Path(sys.argv[1])
    outputs = dict(a.split("=", 1) for a in sys.argv[2:])
    outs = {k: Path(v) for k, v in outputs.items()}
    report = compare(data, outs, formula=tuple(k for k in outs if k.startswith("realign")))
    print(
        json.dumps(
            {
                "elements": report.elements,
                "residual_rms": (report.residual_sq / max(1, report.elements)) ** 0.5,
                **{k: vars(v) for k, v in report.tallies.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
