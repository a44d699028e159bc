"""A Tune callback that records every trial as a nested MLflow run, from the driver alone.

Trials never talk to MLflow: the driver is the single writer, so many concurrent trials cannot
lock a SQLite store, and a remote server sees one client. On a restored search the callback finds
the child runs it already created (by the Ray trial id tag), so no trial is duplicated, and skips
epochs already logged (a trial restored from an older checkpoint repeats them).

Once a trial has ended, its checkpoint in storage keeps ``best.pt`` and the pictures but drops
``last.pt`` (optimizer state, only needed to continue a trial): several times less disk per trial.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from cellseg.checkpoint import BEST, LAST, CheckpointError, load_checkpoint
from cellseg.config import Config, apply_overrides, config_from_dict, flatten
from cellseg.tracking import PARENT_TAG, Tracker
from search.trainable import NODE_KEY

log = logging.getLogger(__name__)

TRIAL_TAG = "ray.trial_id"
_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


class MlflowTrialLogger(Callback):
    """Child run per trial: params, per-epoch metrics, status, best checkpoint and config."""

    def __init__(self, *, tracking_uri: str, experiment: str, parent_run_id: str,
                 base: dict[str, Any], max_epochs: int, metric: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.base = base
        self.max_epochs = max_epochs
        self.metric = metric
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}
        self._logged_epoch: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tracker"] = None
        state["_runs"] = {}
        state["_logged_epoch"] = {}
        return state

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def setup(self, **info: Any) -> None:
        for run in self.tracker.find_runs(self.experiment, f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self._runs[trial_id] = run.info.run_id
                history = self.tracker.client.get_metric_history(run.info.run_id, "epoch")
                self._logged_epoch[trial_id] = max((m.step for m in history), default=0)

    def trial_config(self, trial: Trial) -> Config:
        return apply_overrides(config_from_dict(self.base), trial.config)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id in self._runs:
            self.tracker.client.update_run(self._runs[trial.trial_id], status="RUNNING")
            return
        cfg = self.trial_config(trial)
        self._runs[trial.trial_id] = self.tracker.start_run(
            self.experiment, str(trial), params=flatten(cfg), parent_run_id=self.parent_run_id,
            tags={TRIAL_TAG: trial.trial_id, "cellseg.source": "search",
                  "cellseg.searched_keys": ",".join(sorted(trial.config))})

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        run_id, epoch = self._runs[trial.trial_id], int(result["epoch"])
        if epoch <= self._logged_epoch.get(trial.trial_id, 0):
            return
        self._logged_epoch[trial.trial_id] = epoch
        metrics = {k: v for k, v in result.items() if k not in _SKIP}
        self.tracker.log_metrics(run_id, metrics, step=epoch)
        if NODE_KEY in result:
            self.tracker.set_tags(run_id, {"ray.node_id": result[NODE_KEY]})

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        finished = trial.last_result.get(TRAINING_ITERATION, 0) >= self.max_epochs
        self._close(trial, "FINISHED" if finished else "KILLED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.trial_id not in self._runs:  # failed before it started (e.g. its worker died)
            self.on_trial_start(iteration, trials, trial)
        error_file = trial.error_file
        error = Path(error_file).read_text()[-4000:] if error_file and Path(error_file).is_file() \
            else "trial failed (no error file)"
        self.tracker.set_tags(self._runs[trial.trial_id], {"error": error})
        self._close(trial, "FAILED")

    def _close(self, trial: Trial, status: str) -> None:
        run_id = self._runs[trial.trial_id]
        checkpoint = trial.checkpoint
        if checkpoint is None:
            self.tracker.end_run(run_id, status)
            return
        with checkpoint.as_directory() as directory:
            try:
                best = float(load_checkpoint(Path(directory) / BEST)["metrics"][self.metric])
            except (CheckpointError, KeyError):
                best = float("nan")
            self.tracker.finish_run(run_id, Path(directory), self.trial_config(trial), best, status)
        if status != "FAILED":  # a failed trial may still be restarted from its last state
            try:
                checkpoint.filesystem.delete_file(f"{checkpoint.path}/{LAST}")
            except OSError as exc:
                log.warning("could not remove %s/%s: %s", checkpoint.path, LAST, exc)
