"""Smoke tests of the benchmark scripts: each runs with --tiny and prints its ratio line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
RATIO = re.compile(r"^ratio .+: [-+]?\d+(\.\d+)?(x| %)$", re.MULTILINE)


@pytest.mark.parametrize(
    "script",
    [
        "train_throughput",
        "eval_share",
        "export_memory",
        "data_loading",
        "tune_overhead",
        "reseed_choice",
        "search_efficiency",
        "driver_scale",
    ],
)
def test_benchmark_runs_tiny_and_prints_its_ratio(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--tiny"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert RATIO.search(proc.stdout), proc.stdout
