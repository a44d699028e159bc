"""Each trial's ``result.json`` and ``params.json``, written straight into its folder in local storage.

Tune's JSON logger writes them into the driver's staging folder, and every save of Tune's state
copies that whole folder to the storage: three files per trial, ended or not, so each save costs
more with every trial the search has run (about a second of CPU at 2000 trials). When the
storage is a local path, :class:`StoredResultLogger` writes the same files in the trial's storage
folder instead, where the summary, the ranking and the efficiency figure read them, and Tune's
saves copy only its own state. Remote storage keeps Tune's logger (``search.run.run_config``).
Tune's logger also writes the config pickled (``params.pkl``); nothing reads it, so this one does
not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import pyarrow.fs
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback, LoggerCallback
from ray.tune.result import EXPR_PARAM_FILE, EXPR_PROGRESS_FILE, EXPR_RESULT_FILE, TRAINING_ITERATION
from ray.tune.utils.util import SafeFallbackEncoder

from cellseg.atomic_file import write_atomic


def keep_results_through(path: Path, iteration: int) -> None:
    """Drop the lines of the results file ``path`` past training iteration ``iteration``, and a
    last line cut short by a crash; nothing when there is no such line (or no file).

    A resumed search restarts a trial from what Tune's saved state knows of it, which can be
    behind the results written since that save; the trial reports those iterations again.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            known = line.endswith("\n") and json.loads(line).get(TRAINING_ITERATION, 0) <= iteration
        except ValueError:
            known = False
        if not known:
            break
        kept.append(line)
    if len(kept) < len(text.splitlines()):
        write_atomic(path, lambda file: file.write("".join(kept).encode()))


class StoredResultLogger(LoggerCallback):
    """Tune's JSON logger (``result.json``: one line per result; ``params.json``: the trial's
    config) writing into each trial's folder in local storage rather than the driver's staging
    folder."""

    def __init__(self) -> None:
        self._files: dict[Trial, IO[str]] = {}

    def log_trial_start(self, trial: Trial) -> None:
        self.log_trial_end(trial)
        folder = Path(trial.path)
        folder.mkdir(parents=True, exist_ok=True)
        params = json.dumps(trial.config, indent=2, sort_keys=True, cls=SafeFallbackEncoder)
        (folder / EXPR_PARAM_FILE).write_text(params)  # nothing reads it back: no fsync per trial
        results = folder / EXPR_RESULT_FILE
        keep_results_through(results, int(trial.run_metadata.last_result.get(TRAINING_ITERATION, 0)))
        self._files[trial] = results.open("a")

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        if trial not in self._files:
            self.log_trial_start(trial)
        file = self._files[trial]
        file.write(json.dumps(result, cls=SafeFallbackEncoder) + "\n")
        file.flush()

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        file = self._files.pop(trial, None)
        if file is not None:
            file.close()


def result_logger(local_storage: bool) -> LoggerCallback:
    """The callback that writes each trial's results file: into the trial's folder for
    ``local_storage``, else Tune's JSON logger (the staging folder, copied at each save)."""
    return StoredResultLogger() if local_storage else JsonLoggerCallback()


def ran_with_default_loggers(experiment_path: str, filesystem: pyarrow.fs.FileSystem | None) -> bool:
    """Whether the Tune experiment saved at ``experiment_path`` (on ``filesystem``; None: resolved
    from the URI) ran with Tune's default loggers: a trial folder holds their ``progress.csv``.

    Only an experiment of an earlier cellseg, which passed no JSON logger of its own, did; restored,
    it runs with its saved callbacks and needs Tune to add the loggers again for its
    ``result.json``. The search's own experiments have a JSON logger and want no others.
    """
    if filesystem is None:
        filesystem, experiment_path = pyarrow.fs.FileSystem.from_uri(experiment_path)
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(experiment_path))
    progress = [f"{e.path}/{EXPR_PROGRESS_FILE}" for e in entries if e.type == pyarrow.fs.FileType.Directory]
    return any(info.type == pyarrow.fs.FileType.File for info in filesystem.get_file_info(progress))
