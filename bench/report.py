"""The benchmark's results table (``bench/RESULTS.md``) and machine description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from measure import Run

LABELS = {
    "fused": "`realign merge --no-cache` (fused, one pass), inputs in page cache",
    "cold": "`realign merge --no-cache`, cold page cache",
    "first": "`realign merge --no-cache`, first sight: store hashes the inputs",
    "cached-first": "`realign merge`, residual not stored yet: one pass writes residual + model",
    "apply": "`realign apply` of the cached residual (residual + target in page cache)",
    "mergekit": "mergekit 0.1.5 `mergekit-yaml`, task_arithmetic, default options",
    "naive": "naive transformers: `from_pretrained` x3, bf16 `state_dict` add, `save_pretrained`",
    "fused-2x": "`realign merge --no-cache` on the 2x model, inputs in page cache",
}


@dataclass
class Case:
    """Runs of one command with the bandwidths measured just before each run."""

    name: str
    in_bytes: int
    out_bytes: int
    runs: list[Run] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)
    flush: list[float] = field(default_factory=list)  # fsync of outputs the tool left unsynced
    ratio_vs_fused: list[float] = field(default_factory=list)

    def add(self, r: Run, read_bw: float, write_bw: float) -> None:
        self.runs.append(r)
        self.bounds.append(self.in_bytes / read_bw + self.out_bytes / write_bw)

    def row(self) -> list[str]:
        walls = [r.wall for r in self.runs]
        ratios = [w / b for w, b in zip(walls, self.bounds, strict=True)]
        med = statistics.median
        wall = f"{med(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})"
        flush = f" + {med(self.flush):.2f} fsync" if self.flush else ""
        speed = f"{med(self.ratio_vs_fused):.1f}x" if self.ratio_vs_fused else ""
        return [
            LABELS.get(self.name, self.name),
            str(len(walls)),
            wall + flush,
            f"{med(self.bounds):.2f}",
            f"{med(ratios):.2f}",
            speed,
            f"{max(r.rss_mb for r in self.runs):.0f}",
            f"{med(r.cpu for r in self.runs):.1f}",
            f"{med(r.others for r in self.runs):.2f}",
        ]


def _cmd(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _version(pkg: str, python: Path | None = None) -> str:
    if python is None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"
    code = f"import importlib.metadata as m; print(m.version({pkg!r}))"
    return _cmd(str(python), "-c", code) if python.exists() else "-"


def machine(work: Path) -> list[str]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in _cmd("lscpu").splitlines() if "Model name" in ln),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    mount = max((m for m in mounts if str(work).startswith(m[1])), key=lambda m: len(m[1]))
    mk = Path(__file__).parent / ".venv-mergekit" / "bin" / "python"
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; RAM {mem:.0f} GiB; no GPU",
        f"Disk: {mount[0]} ({mount[2]}, {mount[3].split(',')[0]}) mounted at {mount[1]}",
        f"Kernel {platform.release()}; Python {sys.version.split()[0]}; "
        f"torch {_version('torch')}; transformers {_version('transformers')}; "
        f"mergekit {_version('mergekit', mk)} (torch {_version('torch', mk)}, "
        f"transformers {_version('transformers', mk)}) in bench/.venv-mergekit",
    ]


COMMANDS = """\
```sh
# data (once): a TinyLlama-1.1B-shaped triple, and the same widths with 2x the layers
.venv/bin/python bench/gen_checkpoints.py                  # -> bench/data/1b
.venv/bin/python bench/gen_checkpoints.py --params 2.2e9   # -> bench/data/2b
# mergekit, in its own venv
python3 -m venv bench/.venv-mergekit
bench/.venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
# the benchmark
.venv/bin/python bench/run.py
```

What each case runs (D = bench/data/1b, S = bench/data/work/store):

```sh
realign merge -b D/base -i D/instruct -t D/new_base --out OUT --store S -q --no-cache
realign merge -b D/base -i D/instruct -t D/new_base --out OUT --store S -q
realign apply --residual KEY --target D/new_base --out OUT --store S -q
mergekit-yaml bench/data/work/mergekit.yml OUT      # HF_HUB_OFFLINE=1
python bench/naive_merge.py D/base D/instruct D/new_base OUT
```

```yaml
# bench/data/work/mergekit.yml: new_base + (instruct - base), as Realign computes
merge_method: task_arithmetic
base_model: D/base
models:
  - model: D/instruct
    parameters: {weight: 1.0}
  - model: D/new_base
    parameters: {weight: 1.0}
dtype: bfloat16
```
"""

NOTES = """\
How to read the table:

- *IO bound* = bytes read / read bandwidth + bytes written / durable write bandwidth,
  both measured just before the run it is compared with (same round): the read
  bandwidth is a second sequential read of the inputs (page cache), or a read after
  `drop_caches` for the cold rows; the write bandwidth is a fresh file of the output's
  size written with the faster method above, fsync included. It is the time a tool
  would need if it only moved the bytes, one after the other.
- *wall / bound* is the median of the per-round ratios; *tool / Realign fused* is
  the median of (tool wall / Realign fused wall) over rounds, each pair run back to back.
- Realign fsyncs its output before it returns; mergekit and the naive script do not,
  so their rows add the time an fsync of their output took after they exited
  (`+ N fsync`), which the ratio leaves out.
- *peak RSS* is `ru_maxrss` of the child process (`os.wait4`); *CPU s* is its user +
  system time; *other load* is the cores that other processes kept busy during the
  run (`/proc/stat`), since the benchmark machine may be shared.
- *first sight*: the first time the store sees a checkpoint it sha256-hashes its
  files (then cached by inode, size and mtime in `<store>/.hashes.sqlite`); the
  steady-state rows run with those hashes cached.
- The first cached merge of a pair reads the three inputs once and writes two outputs
  (the residual pack, sha256-hashed for `verify`, and the model): its IO bound counts
  6.6 GB read and 2 x 2.2 GB written. The `realign apply` row reads the residual and
  the target from the page cache.
"""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _accuracy_rows(acc: dict[str, object]) -> list[list[str]]:
    total = int(str(acc.get("elements", 0)))
    scale = float(str(acc.get("residual_rms", 0.0)))
    rows = []
    for name, tally in acc.items():
        if not isinstance(tally, dict):
            continue
        off = int(tally["off"])
        pct = f"{100 * off / total:.4f}%" if total else "-"
        rms = (float(tally["err_sq"]) / total) ** 0.5 if total else 0.0
        if name.endswith("vs fp32 formula"):
            rows.append([name, f"{off:,}", pct, "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{off:,}",
                pct,
                f"{rms:.3g} ({rms / scale:.2%})" if scale else f"{rms:.3g}",
                f"{float(tally['max_ulp']):.2f}",
                str(tally["worst"] or "-"),
            ]
        )
    return rows


def write_report(
    path: Path,
    *,
    cases: list[Case],
    accuracy: dict[str, object],
    machine: list[str],
    write_methods: dict[str, float],
    total_s: float,
    argv: list[str],
) -> None:
    header = [
        "case", "runs", "wall s: median (min-max)", "IO bound s", "wall / bound",
        "tool / Realign fused", "peak RSS MB", "CPU s", "other load (cores)",
    ]  # fmt: skip
    by_name = {c.name: c for c in cases}
    fused = by_name.get("fused")
    sizes = ""
    if fused:
        sizes = (
            f"Inputs {fused.in_bytes / 1e9:.2f} GB (3 checkpoints), output "
            f"{fused.out_bytes / 1e9:.2f} GB."
        )
    lines = [
        "# Benchmark results",
        "",
        "Generated by `.venv/bin/python bench/run.py "
        + " ".join(argv)
        + f"` in {total_s / 60:.1f} min (see bench/README.md).",
        "",
        "## Machine",
        "",
        *(f"- {m}" for m in machine),
        "- Durable write bandwidth, first measurement: "
        + ", ".join(f"{k} {v / 1e6:.0f} MB/s" for k, v in write_methods.items())
        + " (the faster method is used for every IO bound below).",
        "",
        "## Wall time, IO bound, memory",
        "",
        sizes,
        "",
        *_table(header, [c.row() for c in cases]),
        "",
        NOTES,
    ]
    if accuracy:
        lines += [
            "## Correctness: elements that differ from the correctly rounded result",
            "",
            f"Reference: float64 `new_base + (instruct - base)` over "
            f"{int(str(accuracy['elements'])):,} elements, rounded once to bf16 "
            f"(checked in {float(str(accuracy['seconds'])):.0f} s).",
            "",
            *_table(
                [
                    "output",
                    "elements off",
                    "share",
                    "RMS error vs exact (share of RMS residual)",
                    "max error (ulp)",
                    "worst tensor",
                ],
                _accuracy_rows(accuracy),
            ),
            "",
            "*elements off* counts elements whose bits differ from the correctly rounded "
            "result; the errors are against the exact float64 value, so the correctly "
            "rounded row shows the error no bf16 output can avoid (at most 0.5 ulp). The "
            "residual "
            f"(instruct - base) has RMS {float(str(accuracy.get('residual_rms', 0))):.3g}: "
            "an error near that size would mean a different formula. *realign vs fp32 "
            "formula* counts the elements where Realign differs from the plain fp32 formula "
            "`(f32(i) - f32(b)) * alpha + f32(t)` cast once: the formula's double roundings, "
            "which Realign resolves exactly.",
            "",
        ]
    lines += ["## Commands", "", COMMANDS]
    path.write_text("\n".join(lines) + "\n")
