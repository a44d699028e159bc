"""What the driver removes from Tune's storage, and when: real folders, Tune's Checkpoint, and
Tune's saved state file whose modification time marks each save; and, through a real Tune run,
what that state holds with every checkpoint kept."""

from __future__ import annotations

import os
import random
import string
import tempfile
from pathlib import Path

from ray import tune
from ray.tune import Checkpoint

from search import checkpoint_cleanup
from search.checkpoint_cleanup import CheckpointCleanup, checkpoint_uri
from search.run import tune_environment
from searchutil import ray_for_test_trainables


class Storage:
    """A search's experiment folder in Tune's storage, with one trial."""

    def __init__(self, root: Path) -> None:
        self.experiment = root / "s1"
        self.trial = self.experiment / "trial_t1"
        self.trial.mkdir(parents=True)
        self.state = self.experiment / "experiment_state-2026-12-03_19-00-00.json"
        self.state.write_text("{}")
        self._ns = 1_000_000_000

    def checkpoint(self, index: int) -> str:
        folder = self.trial / f"checkpoint_{index:06d}"
        folder.mkdir()
        for name in ("best.pt", "last.pt", "pictures.png"):
            (folder / name).write_bytes(b"x")
        return checkpoint_uri(Checkpoint.from_directory(str(folder)))

    def write(self, state: Path | None = None) -> None:
        """Tune's upload writes to the state file (a whole save, or part of one)."""
        self._ns += 1_000_000_000
        os.utime(state or self.state, ns=(self._ns, self._ns))

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.trial.iterdir())


def saved(storage: Storage, cleanup: CheckpointCleanup) -> None:
    """A whole save, seen at two looks."""
    storage.write()
    cleanup.check()
    cleanup.check()


def test_a_running_trials_older_checkpoints_go_after_two_saves_seen_after_a_first_look(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    for index in (0, 1):
        cleanup.reported("t1", storage.checkpoint(index))
    storage.write()  # a save, perhaps begun before the checkpoints were reported
    cleanup.check()  # the first look
    saved(storage, cleanup)  # perhaps begun before them too
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"]
    cleanup.reported("t1", storage.checkpoint(2))
    saved(storage, cleanup)  # began after the first save counted, so holds checkpoint 1
    assert storage.folders() == ["checkpoint_000001", "checkpoint_000002"]
    assert sorted(p.name for p in (storage.trial / "checkpoint_000001").iterdir()) == [
        "best.pt",
        "last.pt",
        "pictures.png",
    ], "a running trial's latest named checkpoint stays whole"
    cleanup.check()  # no new save: nothing more goes
    assert storage.folders() == ["checkpoint_000001", "checkpoint_000002"]
    saved(storage, cleanup)
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000002"] and not cleanup


def test_a_save_seen_while_it_is_written_counts_once(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    cleanup.reported("t1", storage.checkpoint(0))
    cleanup.reported("t1", storage.checkpoint(1))
    cleanup.check()  # the first look
    for _ in range(3):  # one upload, seen three times while it writes, then done
        storage.write()
        cleanup.check()
    cleanup.check()
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"], (
        "that upload may predate the checkpoint"
    )
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000001"]


def test_an_ended_trial_keeps_its_latest_pictures_once_the_state_holds_its_end(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    cleanup.reported("t1", storage.checkpoint(0))
    latest = storage.checkpoint(1)
    cleanup.reported("t1", latest)
    cleanup.ended("t1", latest)
    cleanup.check()
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"]
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000001"]
    assert [p.name for p in (storage.trial / "checkpoint_000001").iterdir()] == ["pictures.png"]


def test_a_restarted_trial_keeps_its_files_and_the_search_end_removes_ended_trials_files(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    cleanup.ended("t1", storage.checkpoint(0))
    storage.checkpoint(1)
    cleanup.forget("t1")  # Tune runs it again from its latest checkpoint
    for _ in range(3):
        saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"] and not cleanup
    newest = storage.checkpoint(2)
    cleanup.reported("t1", newest)
    cleanup.ended("t1", newest)
    cleanup.finish()  # Tune's final state is saved: no wait
    assert storage.folders() == ["checkpoint_000002"] and not cleanup
    assert [p.name for p in (storage.trial / "checkpoint_000002").iterdir()] == ["pictures.png"]


def test_no_readable_state_removes_nothing(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    storage.state.unlink()  # Tune has not saved yet
    cleanup.reported("t1", storage.checkpoint(0))
    cleanup.reported("t1", storage.checkpoint(1))
    for _ in range(3):
        cleanup.check()
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"] and cleanup


def test_only_the_newest_sessions_state_file_counts(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    older = storage.experiment / "experiment_state-2026-12-02_08-00-00.json"  # before a --resume
    older.write_text("{}")
    cleanup.reported("t1", storage.checkpoint(0))
    cleanup.reported("t1", storage.checkpoint(1))
    cleanup.check()  # the first look
    storage.write(older)  # one upload: the resumed search uploads the older file with its own
    cleanup.check()
    cleanup.check()
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000000", "checkpoint_000001"], "one save, not two"
    storage.write(older)
    saved(storage, cleanup)
    assert storage.folders() == ["checkpoint_000001"]


def test_the_final_save_is_seen_by_a_change_since_the_last_look(tmp_path):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    assert cleanup.final_save_seen(), "nothing was waiting for a save"
    cleanup.reported("t1", storage.checkpoint(0))
    assert cleanup.final_save_seen(), "no look yet: nothing to compare with"
    cleanup.check()
    assert not cleanup.final_save_seen(), "the state file is as the last look saw it"
    storage.write()
    assert cleanup.final_save_seen()


def test_the_final_save_is_looked_for_in_the_last_looks_file(tmp_path, monkeypatch):
    storage, cleanup = Storage(tmp_path), CheckpointCleanup()
    cleanup.reported("t1", storage.checkpoint(0))
    cleanup.check()
    newer = storage.experiment / "experiment_state-2026-12-03_20-00-00.json"
    newer.write_text("{}")  # another file, written after the last look
    monkeypatch.setattr(checkpoint_cleanup, "RELIST_S", 0.0)  # a look would switch to it
    assert not cleanup.final_save_seen(), "the last look's file is unchanged"
    cleanup.check()  # a look switches to the newer file
    storage.write()  # the older one
    assert not cleanup.final_save_seen()
    storage.write(newer)
    assert cleanup.final_save_seen()


LONG_TEXT = 20_000  # characters in every result of the trainable below


def _checkpoints_with_a_long_result(config: dict) -> None:
    text = "".join(random.Random(0).choices(string.ascii_letters, k=LONG_TEXT))
    for epoch in range(1, 13):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "last.pt").write_bytes(b"x")
            tune.report({"epoch": epoch, "text": text}, checkpoint=tune.Checkpoint.from_directory(folder))


def test_tunes_saved_state_holds_the_result_of_the_latest_checkpoint_only(tmp_path: Path):
    with ray_for_test_trainables():  # the workers import the trainable from here
        with tune_environment(strict_metrics=False):
            (result,) = tune.Tuner(
                _checkpoints_with_a_long_result,
                run_config=tune.RunConfig(
                    name="s",
                    storage_path=str(tmp_path),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                ),
            ).fit()
    assert result.error is None and result.metrics["epoch"] == 12
    (state,) = (tmp_path / "s").glob("experiment_state-*.json")
    # the last result and the latest checkpoint's (about 4x); without the setting, 12 more
    assert state.stat().st_size < 6 * LONG_TEXT
