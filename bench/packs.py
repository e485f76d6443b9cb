"""Residual pack formats: size of the exact pack against the bf16 pack, and what computing
and applying each costs against the IO bound of the same work.

Sizes come from the demo's trained tiny models (made here once, ~1 min, or reused from
``bench/data/demo``) and the synthetic bench triple (``bench/data/1b``). Speeds, on the
bench triple, run back to back in each round as fresh child processes (inputs in page
cache, packs read once before they are applied): the fused merge (``--no-cache``, the
yardstick), ``realign compute`` and ``realign apply`` with each format, and for each
exact case its IO bound: a child that
reads the same input files and writes an output of the same size durably (O_DIRECT),
doing nothing else. Reports medians and per-round ratios.

    .venv/bin/python bench/gen_checkpoints.py      # once: bench/data/1b
    .venv/bin/python bench/packs.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import Run, read_files, run, wait_quiet  # noqa: E402

CLI = [sys.executable, "-m", "app.cli"]
IO_BOUND = (
    "import sys; from pathlib import Path; from bench.measure import read_files, write_file; "
    "read_files([Path(p) for p in sys.argv[3:]]); "
    "write_file(Path(sys.argv[1]), int(sys.argv[2]), True)"
)


def _weights(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".frames"))


def _pack(store: Path, key: str) -> Path:
    return store / "residuals" / key


def _compute(triple: dict[str, Path], store: Path, pack: str, log: Path) -> str:
    """Compute (or reuse) a pack; its key (printed last on stdout)."""
    cmd = [*CLI, "compute", "-b", triple["base"], "-i", triple["instruct"], "--pack", pack]
    done = subprocess.run(
        [str(c) for c in (*cmd, "--store", store, "-q")], capture_output=True, text=True
    )
    with log.open("a") as fh:
        fh.write(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"compute --pack {pack} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def sizes(name: str, triple: dict[str, Path], work: Path) -> str:
    """One table row: bf16 and exact pack bytes, their ratio, the corrections."""
    store, log = work / f"sizes-{name}", work / f"sizes-{name}.log"
    shutil.rmtree(store, ignore_errors=True)
    got = {}
    for pack in ("bfloat16", "exact"):
        key = _compute(triple, store, pack, log)
        manifest = json.loads((_pack(store, key) / "manifest.json").read_text())
        elems = sum(_prod(t["shape"]) for t in manifest["tensors"].values())
        fixed = sum(t.get("corrections") or 0 for t in manifest["tensors"].values())
        got[pack] = (sum(f.stat().st_size for f in _weights(_pack(store, key))), fixed / elems)
    (b, _), (e, frac) = got["bfloat16"], got["exact"]
    return f"| {name} | {b / 1e6:.1f} | {e / 1e6:.1f} | {e / b:.3f} | {100 * frac:.2f} % |"


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _demo(root: Path) -> dict[str, Path]:
    """The demo's trained triple, made or found by a child process (this one stays small:
    a child's peak RSS counts the pages it was forked with)."""
    code = (
        "import sys; from pathlib import Path; "
        "from app.demo.train import cached_triple, make_trained_triple; "
        "r = Path(sys.argv[1]); t = cached_triple(r) or make_trained_triple(r); "
        "print(t.base); print(t.instruct); print(t.new_base)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True
    )
    base, instruct, new_base = done.stdout.strip().splitlines()[-3:]
    return {"base": Path(base), "instruct": Path(instruct), "new_base": Path(new_base)}


def speeds(triple: dict[str, Path], work: Path, runs: int, quiet_wait: float) -> None:
    store, log = work / "store", work / "speed.log"
    shutil.rmtree(store, ignore_errors=True)
    keys = {p: _compute(triple, store, p, log) for p in ("bfloat16", "exact")}
    exact_dir = _pack(store, keys["exact"])
    target = _weights(triple["new_base"])
    merged = sum(f.stat().st_size for f in target)
    exact_bytes = sum(f.stat().st_size for f in _weights(exact_dir))
    out = work / "out"
    ins = ["-b", triple["base"], "-i", triple["instruct"]]

    def compute(pack: str) -> list[str | Path]:
        return [*CLI, "compute", *ins, "--pack", pack, "--store", store, "-q"]

    def apply(pack: str) -> list[str | Path]:
        return [*CLI, "apply", "-r", keys[pack], "-t", triple["new_base"], "--store", store,
                "-o", out, "-q"]  # fmt: skip

    def bound(reads: list[Path], nbytes: int) -> list[str | Path]:
        return [sys.executable, "-c", IO_BOUND, work / "io.bin", str(nbytes), *reads]

    ib = _weights(triple["instruct"]) + _weights(triple["base"])
    cases: dict[str, list[str | Path]] = {
        "fused `realign merge --no-cache` (yardstick)": [
            *CLI, "merge", *ins, "-t", triple["new_base"], "--store", store, "-o", out, "-q",
            "--no-cache",
        ],
        "`realign compute --pack bfloat16`": compute("bfloat16"),
        "`realign compute --pack exact`": compute("exact"),
        "IO bound of compute exact (read instruct + base, write the exact pack)": bound(
            ib, exact_bytes
        ),
        "`realign apply` of the bf16 pack": apply("bfloat16"),
        "`realign apply` of the exact pack": apply("exact"),
        "IO bound of apply exact (read the exact pack + target, write the model)": bound(
            _weights(exact_dir) + target, merged
        ),
    }  # fmt: skip
    results: dict[str, list[Run]] = {c: [] for c in cases}
    loads = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for r in range(runs + 1):  # round 0 warms the page cache and the digest cache
        print(f"round {r}/{runs}", flush=True)
        for case, cmd in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            if "compute" in case and "IO bound" not in case:
                shutil.rmtree(_pack(store, keys["exact" if "exact" in case else "bfloat16"]))
            if case.startswith("`realign apply`"):  # a pack just rewritten with O_DIRECT
                read_files(_weights(_pack(store, keys["exact" if "exact" in case else "bfloat16"])))
            loads.append(wait_quiet(0.3, quiet_wait))
            got = run(cmd, log, env=env)
            if r:
                results[case].append(got)
    yard = results[next(iter(cases))]
    print(f"\n{runs} rounds; other load before a case: median {statistics.median(loads):.2f}")
    print("\n| case | wall s median (min-max) | / fused, same round | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for case, rs in results.items():
        walls = [x.wall for x in rs]
        ratio = statistics.median(x.wall / y.wall for x, y in zip(rs, yard, strict=True))
        print(
            f"| {case} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
            f"| {ratio:.2f} | {statistics.median(x.cpu for x in rs):.1f} "
            f"| {statistics.median(x.rss_mb for x in rs):.0f} |"
        )
    names = list(cases)
    for job, io in ((names[2], names[3]), (names[5], names[6])):
        r = statistics.median(
            x.wall / y.wall for x, y in zip(results[job], results[io], strict=True)
        )
        print(f"\n{job}: {r:.2f}x its IO bound (median of per-round ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "bench/data/1b")
    p.add_argument("--demo", type=Path, default=ROOT / "bench/data/demo")
    p.add_argument("--work", type=Path, default=ROOT / "bench/data/work-packs")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--sizes-only", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    bench = {n: a.data / n for n in ("base", "instruct", "new_base")}
    print("| models | bf16 pack MB | exact pack MB | exact / bf16 | corrected elements |")
    print("|---|---|---|---|---|")
    print(sizes("demo (trained tiny Llama)", _demo(a.demo), a.work), flush=True)
    print(sizes("bench triple (synthetic, 1.1B)", bench, a.work), flush=True)
    if not a.sizes_only:
        speeds(bench, a.work, a.runs, a.quiet_wait)


if __name__ == "__main__":
    main()
