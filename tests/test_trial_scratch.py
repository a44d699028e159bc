"""A trial worker's scratch folder outlives a worker killed outright (no exit handlers run);
the next trial on the node removes the folders of dead workers and only those."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from search.trainable import SCRATCH_PREFIX, remove_dead_scratch


def test_the_scratch_of_dead_workers_goes_and_the_rest_stays(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reuse within this test is practically impossible)
    gone = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-abc"
    (gone / "run").mkdir(parents=True)
    (gone / "run" / "last.pt").write_bytes(b"x" * 1024)
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    foreign = [tmp_path / f"{SCRATCH_PREFIX}oldname", tmp_path / "cellseg-other-1-x"]
    for folder in foreign:
        folder.mkdir()
    remove_dead_scratch(tmp_path)
    assert not gone.exists()
    assert alive.is_dir() and all(folder.is_dir() for folder in foreign)
