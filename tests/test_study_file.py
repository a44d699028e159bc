"""Where a search keeps its Optuna study: a journal file, and an older search's SQLite file read
and written where it lies."""

from __future__ import annotations

import os
import pickle
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock

from cellseg.config import load_config
from search.searcher import StudySearcher
from search.space import load_space
from search.study_file import (
    JOURNAL_FILE,
    SQLITE_FILE,
    dashboard_command,
    open_study_storage,
    prepare_study_file,
    study_path,
)

TRIALS = Path(__file__).resolve().parents[1] / "trials"


@pytest.fixture
def space():
    return load_space(TRIALS / "space_demo.yaml", load_config(TRIALS / "demo.yaml"))


def searcher(space, study_file: Path, **kwargs) -> StudySearcher:
    return StudySearcher(
        space,
        metric="segm_AP50",
        mode="max",
        study_file=study_file,
        study_name="s1",
        sampler=optuna.samplers.TPESampler(seed=0),
        max_epochs=1,
        **kwargs,
    )


def finished(study_searcher: StudySearcher, trial_id: str, value: float) -> None:
    study_searcher.suggest(trial_id)
    study_searcher.on_trial_complete(trial_id, {"training_iteration": 1, "segm_AP50": value})


def test_a_new_search_keeps_its_study_in_a_journal(tmp_path, space):
    path = study_path(tmp_path)
    assert path == tmp_path / JOURNAL_FILE and not path.exists()
    finished(searcher(space, path), "a", 0.5)
    assert not (tmp_path / SQLITE_FILE).exists()
    assert study_path(tmp_path) == path and path.stat().st_size > 0
    assert optuna.load_study(study_name="s1", storage=open_study_storage(path)).best_value == 0.5


def test_an_older_search_goes_on_in_its_sqlite_file(tmp_path, space):
    """--continue (and --resume, the summary, --warm-start) on a search from before the journal."""
    old = tmp_path / SQLITE_FILE
    finished(searcher(space, old), "a", 0.5)
    (tmp_path / JOURNAL_FILE).touch()  # an empty journal, as a failed start could leave, is not the study
    assert study_path(tmp_path) == old
    finished(searcher(space, study_path(tmp_path), continue_study=True), "b", 0.7)
    study = optuna.load_study(study_name="s1", storage=open_study_storage(study_path(tmp_path)))
    assert [t.value for t in study.trials] == [0.5, 0.7]
    assert (tmp_path / JOURNAL_FILE).stat().st_size == 0


def test_a_journal_study_survives_the_searchers_pickle_round_trip(tmp_path, space):
    """Tune's saved searcher state holds the study; a restored driver appends to the same file."""
    study_searcher = searcher(space, tmp_path / JOURNAL_FILE)
    finished(study_searcher, "a", 0.5)
    restored = pickle.loads(pickle.dumps(study_searcher))
    finished(restored, "b", 0.7)
    study = optuna.load_study(study_name="s1", storage=open_study_storage(tmp_path / JOURNAL_FILE))
    assert [t.value for t in study.trials] == [0.5, 0.7]


def test_the_dashboard_command_opens_either_file():
    assert dashboard_command(Path("/s/optuna.journal")).startswith("optuna-dashboard /s/optuna.journal ")
    assert dashboard_command(Path("/s/optuna.db")).startswith("optuna-dashboard sqlite:////s/optuna.db ")


def test_a_line_cut_by_a_crash_is_dropped_before_the_study_goes_on(tmp_path, space, monkeypatch):
    """A power loss during an append leaves a last line without its newline; without the repair
    the next append runs on from it and Optuna refuses the file ("Invalid log format")."""
    monkeypatch.setattr("search.study_file.CHUNK", 16)  # the search for the last newline crosses blocks
    journal = tmp_path / JOURNAL_FILE
    finished(searcher(space, journal), "a", 0.5)
    whole = journal.read_bytes()
    with open(journal, "ab") as out:
        out.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "st')
    finished(searcher(space, journal, continue_study=True), "b", 0.7)
    assert journal.read_bytes().startswith(whole)
    study = optuna.load_study(study_name="s1", storage=open_study_storage(journal))
    assert [t.value for t in study.trials] == [0.5, 0.7]


def test_a_journal_that_is_only_a_cut_line_is_emptied(tmp_path):
    journal = tmp_path / JOURNAL_FILE
    journal.write_bytes(b'{"op_code": 0, "worker_id": "x", "study_na')
    open_study_storage(journal)
    assert journal.read_bytes() == b""


def test_an_older_searchs_sqlite_file_is_readied_for_fast_commits(tmp_path):
    """What a resumed older search's restored searcher opens itself: WAL, as before the journal."""
    old = tmp_path / SQLITE_FILE
    prepare_study_file(old)
    optuna.create_study(study_name="s1", storage=f"sqlite:///{old}")
    with sqlite3.connect(old) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_lock_left_by_a_killed_driver_is_removed_and_a_live_one_kept(tmp_path):
    """Optuna would wait 30 s for a lock a driver killed during an append left behind."""
    journal = tmp_path / JOURNAL_FILE
    journal.touch()
    JournalFileSymlinkLock(str(journal)).acquire()  # Optuna's own lock, never released
    (lock,) = set(tmp_path.iterdir()) - {journal}
    prepare_study_file(journal)
    assert lock.is_symlink(), "a lock as young as an append in progress was removed"
    old = time.time() - 60
    os.utime(lock, (old, old), follow_symlinks=False)
    prepare_study_file(journal)
    assert list(tmp_path.iterdir()) == [journal]
