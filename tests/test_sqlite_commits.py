"""cellseg.sqlite_commits on real SQLite files, through real MLflow and Optuna stores."""

from __future__ import annotations

import pickle
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine

from cellseg.sqlite_commits import WAL_ENV, fast_commits, sqlite_file
from cellseg.tracking import Tracker

NORMAL, FULL = 1, 2  # PRAGMA synchronous


def journal_mode(path: Path) -> str:
    """The journal mode kept in the file (WAL is; the rollback modes read as 'delete')."""
    with sqlite3.connect(path) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.fixture
def synchronous() -> Iterator[dict[str, int]]:
    """PRAGMA synchronous of every SQLite connection opened while the test runs, by file name,
    read after cellseg's own ``connect`` listener (registered at import, so it runs first)."""
    seen: dict[str, int] = {}

    def record(connection: object, _record: object) -> None:
        if isinstance(connection, sqlite3.Connection):
            main = next(row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main")
            seen[Path(main).name] = connection.execute("PRAGMA synchronous").fetchone()[0]

    event.listen(Engine, "connect", record)
    yield seen
    event.remove(Engine, "connect", record)


def test_a_trackers_sqlite_store_commits_in_wal_mode_without_a_sync_per_commit(
    mlflow_uri: str, synchronous: dict[str, int]
) -> None:
    path = sqlite_file(mlflow_uri)
    assert path is not None and journal_mode(path) == "delete"  # as MLflow makes it
    tracker = Tracker(mlflow_uri)
    run_id = tracker.start_run("e", "r")
    tracker.log_metrics(run_id, {"m": 0.5}, step=1)
    assert journal_mode(path) == "wal"  # kept in the file: every process opening it uses WAL
    assert synchronous["mlflow.db"] == NORMAL
    assert tracker.metric_history(run_id, "m") == [(1, 0.5)]


def test_files_not_registered_keep_their_journal_mode(tmp_path: Path, synchronous: dict[str, int]) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("create table t (x integer)"))
    engine.dispose()
    assert journal_mode(tmp_path / "other.db") == "delete"
    assert synchronous["other.db"] == FULL


def test_the_environment_can_keep_sqlites_defaults(
    tmp_path: Path, synchronous: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WAL_ENV, "0")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    fast_commits(url)
    optuna.create_study(storage=url, study_name="s").ask()
    assert journal_mode(tmp_path / "optuna.db") == "delete"
    assert synchronous["optuna.db"] == FULL


def test_an_optuna_study_keeps_fast_commits_after_a_pickle_round_trip(
    tmp_path: Path, synchronous: dict[str, int]
) -> None:
    """The searcher's save/restore pickles the study: the restored storage's new engine is covered."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    fast_commits(url)
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert journal_mode(tmp_path / "optuna.db") == "wal"
    synchronous.clear()
    restored = pickle.loads(pickle.dumps(study))
    restored.tell(trial.number, 0.25)
    assert synchronous["optuna.db"] == NORMAL
    assert optuna.load_study(study_name="s", storage=url).best_value == 0.25


def test_commits_survive_the_writer_being_killed(mlflow_uri: str) -> None:
    """WAL with synchronous=NORMAL: a committed write is in the OS cache, a SIGKILL loses none."""
    writer = (
        "import os, signal\n"
        "from cellseg.tracking import Tracker\n"
        f"tracker = Tracker({mlflow_uri!r})\n"
        "run_id = tracker.start_run('e', 'killed')\n"
        "for epoch in range(1, 21):\n"
        "    tracker.log_metrics(run_id, {'m': epoch / 20}, step=epoch)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", writer], check=False)
    assert done.returncode == -signal.SIGKILL
    path = sqlite_file(mlflow_uri)
    assert path is not None and journal_mode(path) == "wal"
    (run,) = Tracker(mlflow_uri).records("e")
    assert Tracker(mlflow_uri).metric_history(run.run_id, "m") == [(e, e / 20) for e in range(1, 21)]


def test_only_sqlite_files_are_registered() -> None:
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("http://127.0.0.1:5000") is None
    assert sqlite_file("sqlite:///relative.db") == Path("relative.db").resolve()
