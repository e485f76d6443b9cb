"""End-to-end benchmark: Realign vs mergekit vs a naive transformers merge, and
the machine's IO bound, measured in the same run; writes ``bench/RESULTS.md``.

    .venv/bin/python bench/gen_checkpoints.py                  # once: bench/data/1b
    .venv/bin/python bench/gen_checkpoints.py --params 2.2e9   # once: bench/data/2b
    .venv/bin/python bench/run.py

Each round measures, back to back: cached read and durable write bandwidth, the
fused merge, the cached-residual path, mergekit and the naive merge, so every
ratio compares runs made under the same conditions. Needs root for the cold runs
(``/proc/sys/vm/drop_caches``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import (
    Run,
    drop_caches,
    read_files,
    run,
    safetensors_files,
    size_of,
    sync_tree,
    wait_quiet,
    write_file,
)
from report import Case, machine, write_report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REALIGN = REPO / ".venv" / "bin" / "realign"
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Bench:
    def __init__(self, data: Path, work: Path) -> None:
        self.data = data
        self.work = work
        self.log = work / "bench.log"
        self.store = work / "store"
        self.models = {k: data / k for k in ("base", "instruct", "new_base")}
        self.inputs = safetensors_files(*self.models.values())
        self.in_bytes = size_of(self.inputs)
        self.out_bytes = size_of(safetensors_files(self.models["new_base"]))
        self.cases: dict[str, Case] = {}
        self.key = ""
        self.direct = True
        self.quiet = (0.3, 0.0)  # (cores, seconds): wait for other processes to calm down

    def settle(self) -> None:
        wait_quiet(*self.quiet)

    def case(self, name: str, in_bytes: int, out_bytes: int) -> Case:
        if name not in self.cases:
            self.cases[name] = Case(name, in_bytes, out_bytes)
        return self.cases[name]

    def fresh(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    def realign(self, *args: str | Path) -> list[str | Path]:
        return [REALIGN, *args, "--store", self.store, "-q"]

    def merge_args(self) -> list[str | Path]:
        m = self.models
        return ["--base", m["base"], "--instruct", m["instruct"], "--target", m["new_base"]]

    def warm(self, files: list[Path]) -> float:
        """Read files twice; return the bandwidth of the second (cached) read."""
        self.settle()
        read_files(files)
        n, secs = read_files(files)
        return n / secs

    def write_bw(self) -> float:
        return self.out_bytes / write_file(self.work / "wtest.bin", self.out_bytes, self.direct)

    def pick_write_method(self) -> dict[str, float]:
        """Durable write bandwidth with and without O_DIRECT; the faster is the bound."""
        bw = {
            mode: self.out_bytes / write_file(self.work / "wtest.bin", self.out_bytes, direct)
            for mode, direct in (("O_DIRECT + fsync", True), ("buffered + fsync", False))
        }
        self.direct = bw["O_DIRECT + fsync"] >= bw["buffered + fsync"]
        return bw

    def first_sight(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)
        rd, wr = self.warm(self.inputs), self.write_bw()
        out = self.fresh("first")
        r = run(self.realign("merge", *self.merge_args(), "--out", out, "--no-cache"), self.log)
        self.case("first", self.in_bytes, self.out_bytes).add(r, rd, wr)
        shutil.rmtree(out)

    def round(self, last: bool, tools: set[str]) -> None:
        rd, wr = self.warm(self.inputs), self.write_bw()
        out = self.fresh("fused")
        r = run(self.realign("merge", *self.merge_args(), "--out", out, "--no-cache"), self.log)
        fused = self.case("fused", self.in_bytes, self.out_bytes)
        fused.add(r, rd, wr)
        self.cached_path()
        for tool in ("mergekit", "naive"):
            if tool in tools:
                t = self.case(tool, self.in_bytes, self.out_bytes)
                t.add(self.run_tool(tool), rd, wr)
                t.ratio_vs_fused.append(t.runs[-1].wall / r.wall)
                if not last:
                    shutil.rmtree(self.work / tool)
        if not last:
            shutil.rmtree(out)

    def cached_path(self) -> None:
        """``realign merge`` computing its residual, then ``realign apply`` reusing it."""
        if self.key:
            run([REALIGN, "rm", self.key, "--store", self.store], self.log)
        out = self.fresh("merged")
        rd, wr = self.warm(self.inputs), self.write_bw()
        r = run(self.realign("merge", *self.merge_args(), "--out", out), self.log)
        self.case("cached-first", self.in_bytes, 2 * self.out_bytes).add(r, rd, wr)
        found = re.findall(r"residual ([0-9a-f]+) \(computed\)", self.log.read_text())
        self.key = found[-1]
        shutil.rmtree(out)
        pack = safetensors_files(self.store / "residuals" / self.key)
        apply_in = [*pack, *safetensors_files(self.models["new_base"])]
        rd, wr = self.warm(apply_in), self.write_bw()
        out = self.fresh("applied")
        cmd = self.realign("apply", "--residual", self.key, "--target", self.models["new_base"])
        r = run([*cmd, "--out", out], self.log)
        self.case("apply", size_of(apply_in), self.out_bytes).add(r, rd, wr)
        shutil.rmtree(out)

    def run_tool(self, tool: str) -> Run:
        out = self.fresh(tool)
        m = self.models
        if tool == "mergekit":
            cfg = self.work / "mergekit.yml"
            cfg.write_text(
                f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n"
                f"  - model: {m['instruct']}\n    parameters:\n      weight: 1.0\n"
                f"  - model: {m['new_base']}\n    parameters:\n      weight: 1.0\n"
                "dtype: bfloat16\n"
            )
            self.warm(self.inputs)
            r = run([MERGEKIT, cfg, out], self.log, env=OFFLINE)
        else:
            self.warm(self.inputs)
            cmd = [sys.executable, HERE / "naive_merge.py", m["base"], m["instruct"], m["new_base"]]
            r = run([*cmd, out], self.log, env=OFFLINE)
        self.case(tool, self.in_bytes, self.out_bytes).flush.append(sync_tree(out))
        return r

    def cold(self, runs: int) -> None:
        for _ in range(runs):
            self.settle()
            wr = self.write_bw()
            if not drop_caches():
                return
            n, secs = read_files(self.inputs)
            drop_caches()
            out = self.fresh("cold")
            r = run(self.realign("merge", *self.merge_args(), "--out", out, "--no-cache"), self.log)
            self.case("cold", self.in_bytes, self.out_bytes).add(r, n / secs, wr)
            shutil.rmtree(out)

    def accuracy(self, outputs: dict[str, Path]) -> dict[str, object]:
        args = [f"{k}={v}" for k, v in outputs.items() if v.is_dir()]
        t0 = time.perf_counter()
        cmd = [sys.executable, HERE / "accuracy.py", self.data, *args]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        found: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
        found["seconds"] = time.perf_counter() - t0
        return found


def bigger_model(data2: Path, work: Path, quiet: tuple[float, float], runs: int) -> Case | None:
    """The fused merge of a model twice the size: wall, bound and peak RSS. One
    unmeasured run first, so that the store has hashed the inputs."""
    if not (data2 / "base").is_dir():
        return None
    b = Bench(data2, work)
    b.quiet = quiet
    case = Case("fused-2x", b.in_bytes, b.out_bytes)
    for i in range(runs + 1):
        rd, wr = b.warm(b.inputs), b.write_bw()
        out = b.fresh("fused2")
        r = run(b.realign("merge", *b.merge_args(), "--out", out, "--no-cache"), b.log)
        if i:
            case.add(r, rd, wr)
        shutil.rmtree(out)
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "data" / "1b")
    ap.add_argument("--data2", type=Path, default=HERE / "data" / "2b")
    ap.add_argument("--work", type=Path, default=HERE / "data" / "work")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--runs2", type=int, default=2, help="measured runs on the 2x model")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each case wait up to this many seconds for other processes to use "
        "under 0.3 cores (shared machines)",
    )
    ap.add_argument("--skip", default="", help="comma list: mergekit,naive,cold,2x,accuracy")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    tools = {"mergekit", "naive"} - skip
    if not MERGEKIT.exists():
        tools.discard("mergekit")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = Bench(args.data.resolve(), args.work.resolve())
    bench.quiet = (0.3, args.quiet_wait)
    write_methods = bench.pick_write_method()
    bench.first_sight()
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs}", flush=True)
        bench.round(r == args.runs - 1, tools)
    if "cold" not in skip:
        bench.cold(args.cold_runs)
    cases = list(bench.cases.values())
    if "2x" not in skip and (
        big := bigger_model(args.data2.resolve(), bench.work, bench.quiet, args.runs2)
    ):
        cases.append(big)
    accuracy: dict[str, object] = {}
    if "accuracy" not in skip:
        outs = {"realign": bench.work / "fused", **{t: bench.work / t for t in tools}}
        accuracy = bench.accuracy(outs)
    write_report(
        args.out,
        cases=cases,
        accuracy=accuracy,
        machine=machine(bench.work),
        write_methods=write_methods,
        total_s=time.perf_counter() - t0,
        argv=sys.argv[1:],
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
