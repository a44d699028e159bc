"""The one atomic writer: umask permissions (checkpoints included), and nothing half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from cellseg.atomic_file import write_atomic
from cellseg.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umask_permissions(tmp_path: Path, umask_027: int) -> None:
    assert _mode(write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))) == umask_027
    state = {"config": {}, "model": {"w": torch.ones(2)}, "epoch": 1}
    checkpoint = save_checkpoint(tmp_path / "run" / "best.pt", state)
    assert _mode(checkpoint) == umask_027  # not mkstemp's 0600
    assert torch.equal(load_checkpoint(checkpoint)["model"]["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "results.json", lambda f: f.write(b"old"))

    def fail(file) -> None:
        file.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
