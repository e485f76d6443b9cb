"""bench/scale.py: the scale-on-paper table runs and its verdicts follow its inputs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = {
    "object-store bandwidth", "cache disk", "worker NIC", "merge math", "shard count",
    "final copies", "input pin", "residual", "Redis",
}  # fmt: skip


def scale(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def walls(text: str, column: int) -> list[float]:
    """Seconds in a wall-time column of the table (70B: 1, 405B: 4)."""
    out = []
    for row in re.findall(r"^\| \d+ \|.*$", text, re.M):
        value, unit = row.split("|")[column + 1].split()
        out.append(float(value) * (60 if unit == "min" else 1))
    return out


def test_table_covers_1_to_64_workers_and_names_the_limit() -> None:
    text = scale("--every")
    for column in (1, 4):
        w = walls(text, column)
        assert len(w) == 64
        assert w[-1] < w[0] / 2  # 64 workers: faster than one, less than linearly
        assert w[-1] <= min(w) * 1.05  # never much slower than the best
    verdicts = re.findall(r"limited by the ([\w -]+)\.", text)
    assert len(verdicts) == 2 and set(verdicts) <= BOUNDS


def test_serial_phases_cap_the_speedup() -> None:
    """The one-node phases (pinning the target, the final copies) do not shrink with
    workers; with a slow server-side copy the final task is the limit."""
    text = scale("--copy-gbps", "0.5")
    assert re.search(r"70B .*limited by the final copies", text)
    first = scale("--mode", "first")
    assert "residual" in first


def test_a_faster_store_leaves_the_one_node_pin_as_the_limit() -> None:
    """Faster links shrink the shard tasks below the pin of the target, which one node
    downloads and hashes whatever the number of workers."""
    text = scale("--store-gbps", "1000", "--nic-gbit", "400", "--disk-gbps", "50")
    assert "70B (140 GB out, 28 shards" in text
    assert re.search(r"70B .*from \*\*28 workers.*limited by the input pin", text)
