"""Ray workers import search/ from the copy the driver ships with the job: it is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRIVER = f"""
import sys
sys.path.insert(0, {str(REPO)!r})  # what search/run.py does for itself
import ray
from search.trainable import WORKER_RUNTIME_ENV

@ray.remote
def where():
    import search.trainable
    return search.trainable.__file__, "matplotlib" in sys.modules

ray.init(num_cpus=1, include_dashboard=False, runtime_env=WORKER_RUNTIME_ENV)
found, plotting = ray.get(where.remote())
print(plotting)
print(found)
"""


def test_workers_import_the_trainable_from_the_shipped_package(tmp_path):
    """A driver outside the repo, no PYTHONPATH: the worker's search/ is the shipped copy; importing
    it leaves matplotlib out (a worker pays for it only when its trial draws its pictures)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, plotting, found = proc.stdout.strip().splitlines()
    found = Path(found)
    assert "runtime_resources" in found.parts, f"the worker imported {found}, not the shipped copy"
    assert found.read_text() == (REPO / "search" / "trainable.py").read_text()
    assert plotting == "False", (
        "a trial's worker imported matplotlib at start; only a trial's last epoch draws"
    )
