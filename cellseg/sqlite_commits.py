"""Commits without an fsync for the SQLite stores this process writes (MLflow's, Optuna's).

A SQLite file registered with :func:`fast_commits` is switched to write-ahead logging (WAL, a
setting kept in the file) when a connection to it opens, and that connection gets
``synchronous=NORMAL``: a commit is a write to the WAL file, synced only when the WAL is copied
back into the database (a checkpoint), instead of three or four fsyncs. A committed transaction
survives the process being killed (it is in the operating system's cache); only a power loss or a
crash of the machine may undo the last commits, never leaving the file inconsistent. WAL needs
every process that opens the file to be on the same machine (no network file system):
``CELLSEG_SQLITE_WAL=0`` keeps SQLite's defaults (rollback journal, a sync per commit) for files
not yet in WAL mode.

Applied through SQLAlchemy's public ``connect`` event on every Engine (its documented way to set
SQLite pragmas), since MLflow builds its engine itself; connections to files not registered, and
files whose journal mode cannot be changed now (another process is writing), are left as they are.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

WAL_ENV = "CELLSEG_SQLITE_WAL"  # "0": leave the registered files as they are
_FILES: set[str] = set()  # resolved paths of the registered SQLite files


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other URI or an in-memory store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].partition("?")[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def fast_commits(uri: str) -> None:
    """Every connection this process opens from now on to the SQLite file of ``uri`` uses WAL and
    ``synchronous=NORMAL``; nothing for other URIs."""
    path = sqlite_file(uri)
    if path is not None:
        _FILES.add(str(path))


@event.listens_for(Engine, "connect")
def _on_connect(connection: Any, record: Any) -> None:
    if not _FILES or not isinstance(connection, sqlite3.Connection) or os.environ.get(WAL_ENV) == "0":
        return
    main = next((row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not main or str(Path(main).resolve()) not in _FILES:
        return
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.OperationalError as exc:  # locked by another process's write
        log.warning("%s stays in its journal mode (%s): every commit syncs the disk", main, exc)
        return
    if mode == "wal":  # NORMAL is safe against a power loss only with WAL
        connection.execute("PRAGMA synchronous=NORMAL")
