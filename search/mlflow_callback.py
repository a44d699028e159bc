"""A Tune callback that records every trial as a nested MLflow run, from the driver alone.

Trials never talk to MLflow: the driver is the single writer, so many concurrent trials cannot
lock a SQLite store, and a remote server sees one client. On a restored search the callback finds
the child runs it already created (by the Ray trial id tag), so no trial is duplicated, and skips
epochs already logged (a trial restored from an older checkpoint repeats them). A driver can die
between Tune's record of a trial's end and the MLflow writes that follow it, so on the first step
of a restored search, every trial that Tune has ended and whose run is still open is closed from
Tune's state (last epoch, best metric, checkpoint, status); at the end of the search, the same
for trials Tune stopped without telling its callbacks (``--time-budget``). A search may be several
Tune experiments (``--reseed-top``, ``--continue``), each with its own callback: every run is
tagged with its experiment (``cellseg.phase``), and a callback closes only runs of its own, never
the open runs of another experiment. Every write goes
through an outbox (search/mlflow_outbox.py): while the store is unavailable writes are queued and
retried, and the search goes on.

Once a trial has ended, its ``best.pt`` and pictures are uploaded to its run; with ``keep_top`` K,
only the K best ended trials (by ``cellseg.best_run``'s rule, the one ``export --best`` ranks by)
keep ``checkpoint/best.pt`` in MLflow: a trial not among them when it ends never uploads it, a
trial pushed out of the top K later loses it; either run keeps metrics, params and config and gets
the tag ``cellseg.checkpoint_dropped``. The re-seed step's
callback drops nothing (a configuration's mean is known only once all its seeds ended): the driver
applies :func:`drop_beyond_top` once after it. Tune's storage holds only what a restore may
still need (search/checkpoint_cleanup.py): a trial's older checkpoints go once Tune's saved state
(which ``--resume`` restores from) names a newer one; once it records the trial's end, also
``best.pt`` and ``last.pt`` (optimizer state) of its latest, so each kept checkpoint lies once, in
MLflow. A FAILED trial keeps its latest checkpoint whole, since ``--resume`` restarts it from it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.tune import Callback, Checkpoint
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS

from cellseg.best_run import Candidate, candidate, export_order, has_checkpoint
from cellseg.checkpoint import BEST, CheckpointError, load_checkpoint
from cellseg.config import Config, apply_overrides, config_from_dict, flatten
from cellseg.data import dataset_fingerprint
from cellseg.tracking import CHECKPOINT_DROPPED_TAG, PARENT_TAG, SOURCE_TAG, Tracker, error_tail
from search.checkpoint_cleanup import CheckpointCleanup, checkpoint_uri, remove_other_checkpoints
from search.driver_drill import DriverDrill, drill_for
from search.mlflow_outbox import Outbox
from search.trainable import reached_max_epochs
from search.tune_report import NODE_KEY, reported_metrics

log = logging.getLogger(__name__)

TRIAL_TAG = "ray.trial_id"
SEARCHED_KEYS_TAG = "cellseg.searched_keys"  # the keys a trial's config sampled, comma-separated
PHASE_TAG = "cellseg.phase"  # the Tune experiment the trial ran in (untagged: the search's first)
_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}
_ENDED = (Trial.TERMINATED, Trial.ERROR)
_CLOSED = ("FINISHED", "KILLED", "FAILED")
CLEANUP_CHECK_S = 1.0  # how often the driver looks whether Tune saved its state again (a listing)
LOST = (
    "the driver stopped before Tune saved this trial; the resumed search runs its parameters "
    "again as a new trial"
)


class MlflowTrialLogger(Callback):
    """Child run per trial: params, per-epoch metrics, status, best checkpoint and config.

    Writes go through an :class:`Outbox`, so an unavailable tracking store delays them instead of
    stopping the search; ``outbox_path`` keeps queued writes across a driver crash.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        base: dict[str, Any],
        max_epochs: int,
        metric: str,
        outbox_path: Path | None = None,
        drain_timeout_s: float = 600.0,
        search_name: str = "",
        phase: str | None = None,
        keep_top: int = 0,
        trial_tags: Callable[[dict[str, Any]], Mapping[str, str]] | None = None,
    ) -> None:
        self.search_name = search_name
        self.phase = phase or search_name  # this callback's Tune experiment
        self.keep_top = keep_top  # 0: every ended trial keeps its checkpoint
        self.trial_tags = trial_tags  # extra tags of a trial's run, from its config
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.base = base
        self.max_epochs = max_epochs
        self.metric = metric
        self.outbox_path = outbox_path
        self.drain_timeout_s = drain_timeout_s
        self._tracker: Tracker | None = None
        self._outbox: Outbox | None = None
        self._runs: dict[str, str] = {}
        self._logged_epoch: dict[str, int] = {}
        self._node: dict[str, str] = {}  # trial id -> the node its run's tag names
        self._closed: set[str] = set()  # trials whose run is closed, or queued to be
        self._elsewhere: set[str] = set()  # trials of the search's other Tune experiments
        self._reconciled = False
        self._drill: DriverDrill | None = None
        self._ended: dict[str, Candidate] = {}  # run id -> exportable ended trial of this search
        self._cleanup = CheckpointCleanup()  # files to remove from Tune's storage
        self._next_check = 0.0
        self._start_tried: set[str] = set()  # trials whose run creation was attempted

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(
            _tracker=None,
            _outbox=None,
            _runs={},
            _logged_epoch={},
            _node={},
            _closed=set(),
            _elsewhere=set(),
            _reconciled=False,
            _drill=None,
            _ended={},
            _cleanup=CheckpointCleanup(),
            _next_check=0.0,
            _start_tried=set(),
        )
        return state

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self._apply, self.outbox_path)
        return self._outbox

    def setup(self, **info: Any) -> None:
        self._drill = drill_for(self.search_name)
        for run in self.tracker.records(self.experiment, f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"):
            trial_id = run.tags.get(TRIAL_TAG)
            if trial_id:
                self._runs[trial_id] = run.run_id
                self._logged_epoch[trial_id] = self.tracker.last_step(run.run_id, "epoch")
                if run.status in _CLOSED:
                    self._closed.add(trial_id)
                if run.tags.get(PHASE_TAG, self.search_name) != self.phase:
                    self._elsewhere.add(trial_id)
                ended = candidate(run)
                if ended is not None:
                    self._ended[run.run_id] = ended
        self.outbox.flush()

    def _drill_point(self, point: str) -> None:
        if self._drill is not None:
            self._drill.reached(point)

    def reconcile(self, trials: list[Trial]) -> None:
        """Close the run of every trial that Tune has ended but MLflow has not, from Tune's state;
        KILLED, the run of a trial of this experiment that Tune does not know (started after
        Tune's last saved state)."""
        known = {trial.trial_id for trial in trials}
        for trial_id in set(self._runs) - known - self._closed - self._elsewhere:
            self._closed.add(trial_id)
            self.outbox.put(
                "close", trial_id=trial_id, name="", config={}, status="KILLED", error=LOST, checkpoint=None
            )
        for trial in trials:
            if trial.status in _ENDED and trial.trial_id not in self._closed:
                log.warning("closing the MLflow run of %s, which ended before the driver stopped", trial)
                if "epoch" in trial.last_result:
                    self._put_result(trial, trial.last_result)
                self._end(trial)

    def trial_config(self, config: dict[str, Any]) -> Config:
        return apply_overrides(config_from_dict(self.base), config)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self._reconciled:  # the trials of a restored search are known from here on
            self._reconciled = True
            self.reconcile(trials)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._closed.discard(trial.trial_id)
        self._cleanup.forget(trial.trial_id)  # running again: its files are in use
        self.outbox.put("start", trial_id=trial.trial_id, name=str(trial), config=trial.config)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self._put_result(trial, result)
        self._drill_point("result")

    def _put_result(self, trial: Trial, result: dict[str, Any]) -> None:
        metrics = reported_metrics(result, _SKIP)
        self.outbox.put(
            "result",
            trial_id=trial.trial_id,
            epoch=int(result["epoch"]),
            metrics=metrics,
            node_id=result.get(NODE_KEY),
        )

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any
    ) -> None:
        self._cleanup.reported(trial.trial_id, checkpoint_uri(checkpoint))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.outbox.put(
            "tags",
            trial_id=trial.trial_id,
            tags={"ray.num_failures": trial.num_failures, "last_error": _error_text(trial)},
        )

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._drill_point("trial-end")
        self._end(trial)
        self._drill_point("closed")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.outbox.pending:
            self.outbox.flush()
        if self._cleanup and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CLEANUP_CHECK_S
            self._cleanup.check()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.reconcile(trials)
        drained = self.outbox.drain(self.drain_timeout_s)
        if not drained:
            log.error(
                "MLflow at %s stayed unavailable for %.0f s after the last trial; %d writes are kept in %s",
                self.tracking_uri,
                self.drain_timeout_s,
                len(self.outbox.pending),
                self.outbox_path,
            )
        if sys.exc_info()[0] is not None or not self._cleanup.final_save_seen():
            log.warning("Tune did not save its final state; Tune's storage keeps every checkpoint it holds")
            return
        for trial in trials:  # Tune's final state is saved: the older checkpoints are only disk
            if trial.status in _ENDED and trial.checkpoint is not None:
                remove_other_checkpoints(trial.checkpoint)
        self._cleanup.finish()  # the ended trials' runs are closed: a kept best.pt is in MLflow

    def _end(self, trial: Trial) -> None:
        """Close the trial's run as Tune ended it: FAILED with its error, FINISHED when it ran
        every epoch, else KILLED (stopped by ASHA or the time budget)."""
        if trial.status == Trial.ERROR:
            self._close(trial, "FAILED", error=_error_text(trial))
        else:
            self._close(
                trial, "FINISHED" if reached_max_epochs(trial.last_result, self.max_epochs) else "KILLED"
            )

    def _close(self, trial: Trial, status: str, error: str | None = None) -> None:
        self._closed.add(trial.trial_id)
        checkpoint = trial.checkpoint
        self.outbox.put(
            "close",
            trial_id=trial.trial_id,
            name=str(trial),
            config=trial.config,
            status=status,
            error=error,
            checkpoint=checkpoint_uri(checkpoint) if checkpoint else None,
        )

    def _apply(self, op: str, /, **kwargs: Any) -> None:
        """Carry out one queued operation."""
        apply = {
            "start": self._apply_start,
            "result": self._apply_result,
            "tags": self._apply_tags,
            "close": self._apply_close,
        }[op]
        apply(**kwargs)

    def _apply_tags(self, trial_id: str, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(self._runs[trial_id], tags)

    def _apply_start(self, trial_id: str, name: str, config: dict[str, Any]) -> None:
        if trial_id in self._runs:
            self.tracker.reopen_run(self._runs[trial_id])
            return
        if trial_id in self._start_tried:  # a retry: the run may have been created just before
            found = self.tracker.records(  # the store went away, the answer lost
                self.experiment,
                f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            )
            if found:
                self._runs[trial_id] = found[0].run_id
                return
        self._start_tried.add(trial_id)
        cfg = self.trial_config(config)
        self._runs[trial_id] = self.tracker.start_run(
            self.experiment,
            name,
            params=flatten(cfg),
            parent_run_id=self.parent_run_id,
            tags={
                TRIAL_TAG: trial_id,
                PHASE_TAG: self.phase,
                SOURCE_TAG: "search",
                SEARCHED_KEYS_TAG: ",".join(sorted(config)),
                **(self.trial_tags(config) if self.trial_tags else {}),
            },
            dataset=dataset_fingerprint(cfg.data),
        )

    def _apply_result(
        self, trial_id: str, epoch: int, metrics: dict[str, float], node_id: str | None
    ) -> None:
        if epoch <= self._logged_epoch.get(trial_id, 0):  # repeated by a trial restored from
            return  # an older checkpoint
        moved = bool(node_id) and self._node.get(trial_id) != node_id  # the tag changes once per node
        self.tracker.log_metrics(
            self._runs[trial_id], metrics, step=epoch, tags={"ray.node_id": node_id} if moved else None
        )
        if moved:
            self._node[trial_id] = node_id
        self._logged_epoch[trial_id] = epoch

    def _apply_close(
        self,
        trial_id: str,
        name: str,
        config: dict[str, Any],
        status: str,
        error: str | None,
        checkpoint: str | None,
    ) -> None:
        if trial_id not in self._runs:  # failed before it started (e.g. its worker died)
            self._apply_start(trial_id, name, config)
        run_id = self._runs[trial_id]
        if error is not None:
            self.tracker.set_error(run_id, error)
        if checkpoint is None:
            self.tracker.end_run(run_id, status)
            return
        filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
        with Checkpoint(path, filesystem).as_directory() as directory:
            try:
                best = float(load_checkpoint(Path(directory) / BEST)["metrics"][self.metric])
            except (CheckpointError, KeyError):
                best = float("nan")
            self.tracker.log_outcome(
                run_id, Path(directory), self.trial_config(config), best, checkpoint=False
            )
            ended = self._rank_ended(run_id, status)
            if ended is None or has_checkpoint(ended.record):
                self.tracker.log_checkpoint(run_id, Path(directory))
        self._drill_point("upload")
        self.tracker.end_run(run_id, status)
        if status != "FAILED":  # a failed trial may still be restarted from its last state
            self._cleanup.ended(trial_id, checkpoint)
        if ended is not None:
            self._ended[run_id] = ended
            if has_checkpoint(ended.record):  # it may push another out
                for out in drop_beyond_top(self.tracker, list(self._ended.values()), self.keep_top):
                    self._ended[out.record.run_id] = replace(
                        self._ended[out.record.run_id], record=out.record
                    )

    def _rank_ended(self, run_id: str, status: str) -> Candidate | None:
        """With ``keep_top``, rank the run being closed as ``status`` among the search's ended
        trials; when it is not among the ``keep_top`` best, drop its checkpoint before it would be
        uploaded (only a tag, unless an earlier close of the run uploaded one). The run as ranked;
        None when nothing is kept or the run cannot be exported."""
        if not self.keep_top:
            return None
        found = candidate(replace(self.tracker.record(run_id), status=status))
        if found is None:
            return None
        beyond, reason = beyond_top(
            [*(c for c in self._ended.values() if c.record.run_id != run_id), found], self.keep_top
        )
        if any(c.record.run_id == run_id for c in beyond):
            found = drop_checkpoint(self.tracker, found, reason)
        return found


def beyond_top(ended: list[Candidate], keep: int) -> tuple[list[Candidate], str]:
    """Rank a search's ``ended`` trials as ``export --best`` ranks them (a re-seeded configuration
    by its mean over seeds): those after the first ``keep`` that still have a checkpoint, and the
    reason their checkpoints go."""
    ranked = export_order(ended)
    beyond = [c for c in ranked if has_checkpoint(c.record)][keep:]
    metric = ranked[0].metric if ranked else ""
    if any(c.seeds for c in ranked):
        reason = (
            f"not among the {keep} best trials in export --best's order: re-seeded configurations "
            f"first, by mean best {metric} over seeds, then each run by its best {metric}"
        )
    else:
        reason = f"not among the {keep} best trials by {metric}"
    return beyond, reason


def drop_beyond_top(tracker: Tracker, ended: list[Candidate], keep: int) -> list[Candidate]:
    """Drop the MLflow checkpoints of the ``ended`` trials :func:`beyond_top`; the dropped runs,
    their records tagged. A dropped run still counts in its configuration's mean."""
    beyond, reason = beyond_top(ended, keep)
    return [drop_checkpoint(tracker, out, reason) for out in beyond]


def drop_checkpoint(tracker: Tracker, run: Candidate, reason: str) -> Candidate:
    """Drop ``run``'s MLflow checkpoint (``Tracker.drop_checkpoint``); the run, its record tagged."""
    tracker.drop_checkpoint(run.record.run_id, reason)
    return replace(run, record=replace(run.record, tags={**run.record.tags, CHECKPOINT_DROPPED_TAG: reason}))


def _error_text(trial: Trial) -> str:
    """The tail of the trial's error file (its traceback)."""
    error_file = trial.error_file
    if error_file and Path(error_file).is_file():
        return error_tail(Path(error_file).read_text())
    return "trial failed (no error file)"
