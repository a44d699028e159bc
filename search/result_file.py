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

import pyarrow
import pyarrow.fs
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback
from ray.tune.result import EXPR_PARAM_FILE, EXPR_PROGRESS_FILE, EXPR_RESULT_FILE, TRAINING_ITERATION
from ray.tune.utils.util import SafeFallbackEncoder

from cellseg.atomic_file import write_atomic


def keep_results_through(path: Path, iteration: int) -> None:
    """Drop the lines of the results file ``path`` past training iteration ``iteration``, and a
    last line cut short by a crash; nothing when there is no such line (or no file).

    A restarted trial continues after its latest checkpoint as Tune's state knows it, which can be
    behind the results written before the restart (a resumed search); it reports those again.
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


def resumes_after(trial: Trial) -> int:
    """The training iteration a (re)started ``trial`` continues after: its latest checkpoint's."""
    checkpoint = trial.latest_checkpoint_result
    return int(checkpoint.metrics.get(TRAINING_ITERATION, 0)) if checkpoint else 0


class StoredResultLogger(JsonLoggerCallback):
    """Tune's JSON logger (``result.json``: one line per result; ``params.json``: the trial's
    config) writing into each trial's folder in local storage rather than the driver's staging
    folder. Every method is replaced; it is a ``JsonLoggerCallback`` so that Tune, where it adds
    its default loggers (a restored experiment of an earlier cellseg), adds no second one, whose
    copy from the staging folder would overwrite this file."""

    def __init__(self) -> None:
        super().__init__()
        self._files: dict[Trial, IO[str]] = {}

    def log_trial_start(self, trial: Trial) -> None:
        self.log_trial_end(trial)
        folder = Path(trial.path)
        folder.mkdir(parents=True, exist_ok=True)
        self.update_config(trial, trial.config)
        results = folder / EXPR_RESULT_FILE
        keep_results_through(results, resumes_after(trial))
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

    def update_config(self, trial: Trial, config: dict[str, Any]) -> None:
        params = json.dumps(config, indent=2, sort_keys=True, cls=SafeFallbackEncoder)
        Path(trial.path, EXPR_PARAM_FILE).write_text(params)  # nothing reads it back: no fsync

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial in list(self._files):  # still running when the experiment stopped
            self.log_trial_end(trial)


def result_logger(local_storage: bool) -> JsonLoggerCallback:
    """The callback that writes each trial's results file: into the trial's folder for
    ``local_storage``, else Tune's JSON logger (the staging folder, copied at each save)."""
    return StoredResultLogger() if local_storage else JsonLoggerCallback()


def needs_default_loggers(experiment_path: str, filesystem: pyarrow.fs.FileSystem | None) -> bool:
    """Whether the Tune experiment saved at ``experiment_path`` (on ``filesystem``; None: resolved
    from the URI) is to be restored with Tune's default loggers.

    An experiment of a cellseg before 2026-12-04 passed no JSON logger of its own; restored, it
    runs with its saved callbacks and gets ``result.json`` only from Tune's defaults. Its trials
    have Tune's ``progress.csv``; the search's own experiments have ``result.json`` alone. The
    first trial folder with either decides; with neither (no trial reported), the defaults, where
    the search's own logger keeps Tune from adding a second JSON logger.
    """
    try:
        if filesystem is None:
            filesystem, experiment_path = pyarrow.fs.FileSystem.from_uri(experiment_path)
    except pyarrow.ArrowException:  # a scheme pyarrow cannot open: Tune's defaults are safe
        return True
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(experiment_path))
    for folder in sorted(e.path for e in entries if e.type == pyarrow.fs.FileType.Directory):
        progress, results = filesystem.get_file_info(
            [f"{folder}/{EXPR_PROGRESS_FILE}", f"{folder}/{EXPR_RESULT_FILE}"]
        )
        if progress.type == pyarrow.fs.FileType.File:
            return True
        if results.type == pyarrow.fs.FileType.File:
            return False
    return True
