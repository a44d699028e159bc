"""Removing a search's checkpoints from Tune's storage once no restore can need them.

``--resume`` restores from Tune's saved experiment state, which names each trial's latest
checkpoint; a file may go only once the saved state no longer needs it. Tune keeps every checkpoint
a trial reports (``CheckpointConfig(num_to_keep=None)``, search/run.py): with a limit, Tune forces
a save of its whole state (every trial's) whenever a trial has reported that many checkpoints since
the last save, which made the driver's cost per result grow with the number of trials
(docs/performance.md). Unforced, Tune saves its state every 10 s or more. Instead, once Tune's
saved state names a trial's newer checkpoint, the trial's older ones are removed here; once it
records the trial's end (and its ``best.pt`` is in MLflow), its other checkpoints and ``best.pt``
and ``last.pt`` of its latest.

Saves are seen by the modification time of Tune's state file in storage: the newest by name, the
one ``--resume`` restores from (a resumed search writes a new file and uploads the older ones with
it at every save, so only one file may count). A look stats that file alone and lists the folder
only to find it (at the first look, when it is gone, and every ``RELIST_S`` for a newer session's).
A save counts once that time, other than the one at the first look after an event (a checkpoint
reported, a trial ended), is seen unchanged at two looks in a row: Tune's upload writes the file in
place on a local file system, so a look during the write sees a time the write then changes. Tune
uploads one save at a time, so the first save counted was still being written at or after the
first look, and the second began after it, hence after the event: it holds the event. (What this
assumes: an upload does not stall mid-file for a whole look's interval.)

At the search's end Tune saves its state once more; if that save did not happen (the file's time
is the last look's, or the search ended on an exception), nothing more is removed. (Not caught: a
failed final save after an earlier upload that finished after the last look; Tune logs the error.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
from ray.tune import Checkpoint

from cellseg.checkpoint import BEST, LAST
from search.linked_storage import is_local

log = logging.getLogger(__name__)

SAVED_STATE = "experiment_state-"  # Tune's saved state: <storage>/<name>/experiment_state-<session>.json
RELIST_S = 60.0  # how often a look lists the experiment folder for a newer session's state file


@dataclass
class _Pending:
    checkpoint: str  # URI of a trial's checkpoint that Tune's saved state is to hold
    ended: bool  # the trial's last checkpoint (it ended), else a newer one than those to remove
    saved_ns: int | None = None  # the saved state's time at the last look (None: not looked yet)
    settled: bool = True  # that time was seen at two looks in a row (or is the first look's)
    saves: int = 0  # saves counted since the first look after the event


class CheckpointCleanup:
    """The checkpoint files of a search's trials waiting for Tune's saved state."""

    def __init__(self) -> None:
        self._pending: dict[str, list[_Pending]] = {}  # trial id -> in the order of the events
        self._state: SavedState | None = None
        self._seen_ns: int | None = None  # the state file's time at the last look

    def __bool__(self) -> bool:
        return bool(self._pending)

    def reported(self, trial_id: str, checkpoint: str) -> None:
        """The trial reported ``checkpoint``: its older checkpoints go once the state holds it."""
        self._pending.setdefault(trial_id, []).append(_Pending(checkpoint, ended=False))
        if self._state is None:
            self._state = SavedState(checkpoint)

    def ended(self, trial_id: str, checkpoint: str) -> None:
        """The trial ended with ``checkpoint`` and its ``best.pt`` is in MLflow: its other
        checkpoints and the model files of this one go once the state records the end."""
        self._pending[trial_id] = [_Pending(checkpoint, ended=True)]
        if self._state is None:
            self._state = SavedState(checkpoint)

    def forget(self, trial_id: str) -> None:
        """The trial runs again (restored): its files are in use."""
        self._pending.pop(trial_id, None)

    def check(self) -> None:
        """Look at Tune's saved state once and remove what the saves seen since allow."""
        if not self._pending or self._state is None:
            return
        saved_ns = self._state.mtime_ns()
        if saved_ns is None:
            return
        self._seen_ns = saved_ns
        for trial_id, pending in list(self._pending.items()):
            for entry in pending:
                if entry.saved_ns is None:
                    entry.saved_ns = saved_ns
                elif saved_ns != entry.saved_ns:
                    entry.saved_ns, entry.settled = saved_ns, False
                elif not entry.settled:
                    entry.saves, entry.settled = entry.saves + 1, True
            ready = sum(entry.saves >= 2 for entry in pending)  # the oldest ones (looked at first)
            if ready:
                _remove(pending[ready - 1])  # the newest ready one covers the older
                del pending[:ready]
            if not pending:
                del self._pending[trial_id]

    def final_save_seen(self) -> bool:
        """Whether Tune's state file changed since the last look (its save at the search's end);
        True when there was nothing to look for."""
        if self._state is None or self._seen_ns is None:
            return True
        saved_ns = self._state.mtime_ns(relist=False)
        return saved_ns is not None and saved_ns != self._seen_ns

    def finish(self) -> None:
        """At the search's end, after Tune's final save: remove the ended trials' files now."""
        for pending in self._pending.values():
            for entry in pending:
                if entry.ended:
                    _remove(entry)
        self._pending.clear()


def _remove(entry: _Pending) -> None:
    filesystem, path = pyarrow.fs.FileSystem.from_uri(entry.checkpoint)
    latest = Checkpoint(path, filesystem)
    if entry.ended:
        for name in (LAST, BEST):  # pictures stay
            try:
                if filesystem.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.File:
                    filesystem.delete_file(f"{path}/{name}")
            except OSError as exc:
                log.warning("could not remove %s/%s: %s", path, name, exc)
    remove_other_checkpoints(latest, older_only=not entry.ended)


def remove_other_checkpoints(latest: Checkpoint, *, older_only: bool = False) -> None:
    """Delete the trial's checkpoint folders beside ``latest`` (Tune names them alike, numbered),
    with ``older_only`` only those numbered before it."""
    folder, _, name = latest.path.rstrip("/").rpartition("/")
    prefix = name.rstrip("0123456789")
    try:
        for info in latest.filesystem.get_file_info(pyarrow.fs.FileSelector(folder)):
            if (
                info.type == pyarrow.fs.FileType.Directory
                and info.base_name != name
                and info.base_name.startswith(prefix)
                and (not older_only or info.base_name < name)
            ):
                latest.filesystem.delete_dir(info.path)
    except OSError as exc:
        log.warning("could not remove checkpoints beside %s: %s", latest.path, exc)


class SavedState:
    """Tune's saved state file of the search of ``checkpoint`` (a checkpoint URI,
    ``<experiment>/<trial>/<checkpoint>``): the newest by name, as Tune's restore picks it."""

    def __init__(self, checkpoint: str) -> None:
        self.filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
        self.experiment = path.rstrip("/").rpartition("/")[0].rpartition("/")[0]
        self.path: str | None = None
        self._listed = -RELIST_S

    def mtime_ns(self, *, relist: bool = True) -> int | None:
        """When Tune last wrote the file; None when there is none or it cannot be read. Without
        ``relist``, the file of the last look (so that two times compared are of one file)."""
        try:
            if relist and (self.path is None or time.monotonic() - self._listed >= RELIST_S):
                self._listed = time.monotonic()
                self.path = self._newest()
            if self.path is None:
                return None
            info = self.filesystem.get_file_info(self.path)
        except OSError as exc:
            log.warning("could not read Tune's saved state in %s: %s", self.experiment, exc)
            return None
        if info.type != pyarrow.fs.FileType.File:
            self.path = None  # gone: the next look lists the folder again
            return None
        return info.mtime_ns

    def _newest(self) -> str | None:
        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.experiment))
        names = [
            i.path for i in infos if i.base_name.startswith(SAVED_STATE) and i.base_name.endswith(".json")
        ]
        return max(names, key=lambda p: p.rpartition("/")[2], default=None)


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """A URI that pyarrow resolves back to the checkpoint's file system and path."""
    if is_local(checkpoint.filesystem):
        return str(Path(checkpoint.path).resolve())
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"
