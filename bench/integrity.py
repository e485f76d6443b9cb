"""What verifying a stored residual pack on read costs.

Three cases, run back to back in each round (fresh child processes, inputs in page
cache): the fused merge (``--no-cache``, reads no stored artifact: the yardstick),
``realign apply`` of a pack written by this version (each file checked by its
XXH3-128 as it is read), and ``realign apply`` of the same pack as an older version
wrote it (sha256 only, manifest resealed: checked by sha256). Reports the medians
of wall and CPU seconds and of the per-round ratios to the yardstick.

    .venv/bin/python bench/gen_checkpoints.py      # once: bench/data/1b
    .venv/bin/python bench/integrity.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import Run, run, wait_quiet  # noqa: E402

CLI = [sys.executable, "-m", "app.cli"]


def sha256_only(pack: Path, out: Path) -> Path:
    """A copy of ``pack`` whose manifest records sha256 only (as written before)."""
    from app.residuals.manifest import read_residual_manifest, write_json

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pack, out)
    m = read_residual_manifest(pack)
    files = {n: e.model_copy(update={"xxh3_128": None}) for n, e in m.files.items()}
    write_json(out / "manifest.json", m.model_copy(update={"files": files}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "bench/data/1b")
    p.add_argument("--work", type=Path, default=ROOT / "bench/data/work-integrity")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    a = p.parse_args()
    d, w = a.data, a.work
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    store = w / "store"
    ins = ["-b", d / "base", "-i", d / "instruct"]
    log = w / "log.txt"
    run([*CLI, "compute", *ins, "--store", store, "-q"], log)
    (pack,) = (store / "residuals").iterdir()
    old = sha256_only(pack, w / "old-pack")
    cases = {
        "fused `realign merge --no-cache` (yardstick)": [
            *CLI, "merge", *ins, "-t", d / "new_base", "--store", store, "-q", "--no-cache",
        ],
        "`realign apply`, pack checked by XXH3-128 as read": [
            *CLI, "apply", "--residual", pack.name, "--target", d / "new_base",
            "--store", store, "-q",
        ],
        "`realign apply`, same pack with sha256 only (as written before)": [
            *CLI, "apply", "--residual", old, "--target", d / "new_base", "--store", store, "-q",
        ],
    }  # fmt: skip
    for cmd in cases.values():  # warm-up: inputs hashed once, page cache filled
        shutil.rmtree(w / "out", ignore_errors=True)
        run([*cmd, "--out", w / "out"], log)
    results: dict[str, list[Run]] = {c: [] for c in cases}
    loads: list[float] = []
    for r in range(a.runs):
        print(f"round {r + 1}/{a.runs}", flush=True)
        for case, cmd in cases.items():
            out = w / "out"
            shutil.rmtree(out, ignore_errors=True)
            loads.append(wait_quiet(0.3, a.quiet_wait))
            results[case].append(run([*cmd, "--out", out], log))
    yard = results[next(iter(cases))]
    load = statistics.median(loads)
    print(f"\n{a.runs} rounds; other load before a case: median {load:.2f} cores\n")
    print("| case | wall s median (min-max) | / fused, same round | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for case, runs in results.items():
        walls = [x.wall for x in runs]
        ratio = statistics.median(x.wall / y.wall for x, y in zip(runs, yard, strict=True))
        print(
            f"| {case} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
            f"| {ratio:.2f} | {statistics.median(x.cpu for x in runs):.1f} "
            f"| {statistics.median(x.rss_mb for x in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
