"""Where a search keeps its Optuna study, and how it is opened.

A new search keeps its study in ``optuna.journal`` in the search's folder: Optuna's journal file
(``JournalStorage`` on a ``JournalFileBackend``), one JSON line appended and synced per change. The
driver is its only writer, and Optuna spends about a third of the CPU time per trial on it that it
spends on a SQLite study (docs/performance.md). Searches from before 2026-12-05 kept the study in a
SQLite file, ``optuna.db``; where such a file lies and no journal with anything in it does, that
file goes on being written (``--resume``, ``--continue``) and read (``--warm-start``, the summary).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from cellseg.sqlite_commits import fast_commits

JOURNAL_FILE = "optuna.journal"
SQLITE_FILE = "optuna.db"  # the study file of searches from before 2026-12-05
CHUNK = 1 << 16  # bytes read at a time, from the end, to find the last whole line
LOCK_FILE_SUFFIX = ".lock"  # JournalFileSymlinkLock's lock is the journal's path with this added
STALE_LOCK_S = 5.0

log = logging.getLogger(__name__)


def study_path(folder: Path) -> Path:
    """The study file of the search in ``folder``: an older search's SQLite file where one lies
    and no journal with anything in it does, else the journal (which may not exist yet)."""
    journal, old = folder / JOURNAL_FILE, folder / SQLITE_FILE
    written = journal.is_file() and journal.stat().st_size > 0
    return old if old.is_file() and not written else journal


def open_study_storage(path: Path) -> BaseStorage | str:
    """Optuna's storage for the study file ``path`` (from :func:`study_path`) of this driver's
    search, made ready for its writes (:func:`prepare_study_file`)."""
    prepare_study_file(path)
    return study_storage(path)


def study_storage(path: Path) -> BaseStorage | str:
    """Optuna's storage for the study file ``path`` as it is (an earlier search's, to read): a
    journal, or the URL of an older search's SQLite file."""
    if path.name == SQLITE_FILE:
        return f"sqlite:///{path}"
    return JournalStorage(JournalFileBackend(str(path)))


def prepare_study_file(path: Path) -> None:
    """Ready the study file ``path`` for this driver's writes, also where a searcher restored by
    Tune opens it itself: an older search's SQLite file commits without a disk sync
    (cellseg/sqlite_commits.py); a journal loses a lock and a cut last line that a crash left."""
    if path.name == SQLITE_FILE:
        fast_commits(f"sqlite:///{path}")
    else:
        drop_stale_lock(path)
        drop_cut_line(path)


def drop_stale_lock(journal: Path) -> None:
    """Remove the lock of ``journal`` that a driver killed during an append left. Optuna would
    wait 30 s before taking it over. The driver is its study's only writer, and an append holds
    the lock for milliseconds, so a lock older than ``STALE_LOCK_S`` is a leftover."""
    lock = Path(f"{journal}{LOCK_FILE_SUFFIX}")
    try:
        age = time.time() - lock.lstat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        log.warning("%s: removed the lock a crash left (%.0f s old)", lock, age)


def drop_cut_line(journal: Path) -> None:
    """Cut off a last line without its newline, which a power loss during an append can leave:
    Optuna skips such a line when it reads, but the next append would run on from it and make
    the file unreadable. Done under Optuna's own lock of the file, so a writer's append in
    progress is never taken for one."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    try:
        with open(journal, "rb+") as out:
            size = out.seek(0, os.SEEK_END)
            keep = _whole_lines_end(out, size)
            if keep < size:
                out.truncate(keep)
                log.warning("%s: dropped a cut last line (%d bytes) that a crash left", journal, size - keep)
    finally:
        lock.release()


def _whole_lines_end(file: BinaryIO, size: int) -> int:
    """The offset just past the last newline of ``file`` (``size`` bytes long); 0 if it has none."""
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        file.seek(start)
        newline = file.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def dashboard_command(path: Path) -> str:
    """The command that opens the study file ``path`` in ``optuna-dashboard``."""
    target = f"sqlite:///{path}" if path.name == SQLITE_FILE else str(path)
    return f"optuna-dashboard {target} --host 127.0.0.1 --port 8080"
