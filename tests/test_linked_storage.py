"""Checkpoints reported into local storage are hard links of the trial's files, never written
through, and a retried trial restores from them."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs
import pytest
from ray import tune

from search.linked_storage import is_local, linking_filesystem, links_checkpoints, storage_filesystem
from searchutil import ray_for_test_trainables


def _write_anew(path: Path, data: bytes) -> None:
    """As save_checkpoint writes: a new file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _copy(src: Path, dst: Path) -> None:
    fs = linking_filesystem()
    fs.create_dir(str(dst))  # as Tune does before it copies a checkpoint
    pyarrow.fs.copy_files(str(src), str(dst), source_filesystem=fs, destination_filesystem=fs)


def test_a_copy_is_a_hard_link_that_keeps_the_reported_version(tmp_path: Path):
    src = tmp_path / "run"
    (src / "pictures").mkdir(parents=True)
    _write_anew(src / "last.pt", b"epoch 1")
    (src / "pictures" / "history.png").write_bytes(b"png")
    _copy(src, tmp_path / "checkpoint_000000")
    stored = tmp_path / "checkpoint_000000" / "last.pt"
    assert stored.stat().st_ino == (src / "last.pt").stat().st_ino
    assert (tmp_path / "checkpoint_000000" / "pictures" / "history.png").read_bytes() == b"png"
    _write_anew(src / "last.pt", b"epoch 2")  # the next epoch
    assert stored.read_bytes() == b"epoch 1"


def test_an_existing_destination_is_replaced_not_written_through(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"new")
    other = tmp_path / "other"
    other.write_bytes(b"keep")
    os.link(other, tmp_path / "b" / "f")
    _copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_bytes() == b"new"
    assert other.read_bytes() == b"keep"


def test_across_file_systems_a_copy_is_a_copy(tmp_path: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to copy to")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"weights")
    dst = shm / f"cellseg-test-{os.getpid()}"
    try:
        _copy(tmp_path / "run", dst)
        assert (dst / "last.pt").read_bytes() == b"weights"
        assert (dst / "last.pt").stat().st_dev != (tmp_path / "run" / "last.pt").stat().st_dev
    finally:
        linking_filesystem().delete_dir(str(dst))


def test_local_paths_link_and_uris_keep_tunes_file_system():
    assert storage_filesystem("s3://bucket/searches") is None
    assert links_checkpoints("runs/search/s1") and not links_checkpoints("s3://bucket/searches")
    fs = storage_filesystem("/data/searches")
    assert fs is not None and is_local(fs) and is_local(pyarrow.fs.LocalFileSystem())


def _reports_three_epochs_failing_once(config: dict) -> None:
    folder, log = Path(config["scratch"]), Path(config["log"])
    start = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            start = int(Path(restored, "state").read_text()) + 1
    folder.mkdir(exist_ok=True)
    for epoch in range(start, 4):
        if epoch == 3 and not (log / "failed").exists():
            (log / "failed").touch()
            raise RuntimeError("the first attempt fails at epoch 3")
        _write_anew(folder / "state", str(epoch).encode())
        (log / f"inode-{epoch}").write_text(str((folder / "state").stat().st_ino))
        tune.report(
            {"epoch": epoch}, checkpoint=tune.Checkpoint(str(folder), filesystem=linking_filesystem())
        )


def test_tune_links_each_reported_checkpoint_and_a_retried_trial_restores_from_it(tmp_path: Path):
    storage = tmp_path / "storage"
    with ray_for_test_trainables():  # the workers import the trainable from here
        (result,) = tune.Tuner(
            _reports_three_epochs_failing_once,
            param_space={"scratch": str(tmp_path / "scratch"), "log": str(tmp_path)},
            run_config=tune.RunConfig(
                name="s",
                storage_path=str(storage),
                storage_filesystem=storage_filesystem(str(storage)),
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        ).fit()
    assert result.error is None and result.metrics["epoch"] == 3
    (trial,) = (storage / "s").glob("*/")
    for index, epoch in enumerate((1, 2, 3)):
        stored = trial / f"checkpoint_{index:06d}" / "state"
        assert stored.read_text() == str(epoch)  # epoch 3 came after the restore from epoch 2
        assert stored.stat().st_ino == int((tmp_path / f"inode-{epoch}").read_text())
