"""A Tune callback that records every trial as a nested MLflow run, decided by the driver alone.

Trials never talk to MLflow: the driver is the single writer, so many concurrent trials cannot
lock a SQLite store, and a remote server sees one client. The callback decides each write and
hands it to the MLflow writer process (search/mlflow_writer.py), which journals it and applies it
(search/trial_runs.py) outside Tune's loop, retrying while the store is unavailable, so the
search goes on. On a restored search the writer finds the child runs already created (by the Ray
trial id tag), so no trial is duplicated, and skips epochs already logged (a trial restored from
an older checkpoint repeats them). A driver can die between Tune's record of a trial's end and
the MLflow writes that follow it, so on the first step of a restored search, every trial that
Tune has ended and whose run is still open is closed from Tune's state (last epoch, best metric,
checkpoint, status); at the end of the search, the same for trials Tune stopped without telling
its callbacks (``--time-budget``). A search may be several Tune experiments (``--reseed-top``,
``--continue``), each with its own callback: every run is tagged with its experiment
(``cellseg.phase``), and a callback closes only runs of its own, never the open runs of another
experiment.

Once a trial has ended, its ``best.pt`` and pictures are uploaded to its run, with ``keep_top``
only for the K best ended trials (search/trial_runs.py). The re-seed step's callback drops
nothing (a configuration's mean is known only once all its seeds ended): the driver applies
``drop_beyond_top`` once after it. Tune's storage holds only what a restore may still need
(search/checkpoint_cleanup.py): a trial's older checkpoints go once Tune's saved state (which
``--resume`` restores from) names a newer one; once it records the trial's end, and the writer
has closed its run, also ``best.pt`` and ``last.pt`` (optimizer state) of its latest, so each
kept checkpoint lies once, in MLflow. A FAILED trial keeps its latest checkpoint whole, since
``--resume`` restarts it from it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback, Checkpoint
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS

from cellseg.errors import TrackingError
from cellseg.tracking import RunRecord, Tracker, error_tail, is_unavailable
from search.checkpoint_cleanup import CheckpointCleanup, checkpoint_uri, remove_other_checkpoints
from search.driver_drill import DriverDrill, drill_for
from search.mlflow_outbox import RETRY_AFTER_S
from search.mlflow_writer import JOURNAL, MlflowWriter, segments
from search.trainable import reached_max_epochs
from search.trial_runs import PHASE_TAG, TRIAL_TAG, RunsSpec, trial_records
from search.tune_report import NODE_KEY, reported_metrics

log = logging.getLogger(__name__)

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

    Writes go to the MLflow writer process, which journals them in ``journal`` (a folder), so an
    unavailable tracking store delays them instead of stopping the search, and a driver crash
    loses none.
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
        journal: Path,
        drain_timeout_s: float = 600.0,
        search_name: str = "",
        phase: str | None = None,
        keep_top: int = 0,
        trial_tags: Callable[[dict[str, Any]], Mapping[str, str]] | None = None,
    ) -> None:
        self.spec = RunsSpec(
            tracking_uri=tracking_uri,
            experiment=experiment,
            parent_run_id=parent_run_id,
            base=base,
            metric=metric,
            keep_top=keep_top,
            search_name=search_name,
        )
        self.phase = phase or search_name  # this callback's Tune experiment
        self.trial_tags = trial_tags  # extra tags of a trial's run, from its config
        self.max_epochs = max_epochs
        self.journal = journal
        self.drain_timeout_s = drain_timeout_s
        self._writer: MlflowWriter | None = None
        self._runs: set[str] = set()  # trials with a run, or queued to get one
        self._closed: set[str] = set()  # trials whose run is closed, or queued to be
        self._elsewhere: set[str] = set()  # trials of the search's other Tune experiments
        self._started: dict[str, int] = {}  # trial id -> the number of its latest start write
        self._replayed: dict[str, str] = {}  # trial id -> checkpoint an earlier driver's close freed
        self._reconciled = False
        self._drill: DriverDrill | None = None
        self._cleanup = CheckpointCleanup()  # files to remove from Tune's storage
        self._next_check = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(
            _writer=None,
            _runs=set(),
            _closed=set(),
            _elsewhere=set(),
            _started={},
            _replayed={},
            _reconciled=False,
            _drill=None,
            _cleanup=CheckpointCleanup(),
            _next_check=0.0,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "spec" not in state:  # pickled by a version before the writer process (Tuner.restore)
            keys = (
                "tracking_uri",
                "experiment",
                "parent_run_id",
                "base",
                "metric",
                "keep_top",
                "search_name",
            )
            spec = RunsSpec(**{key: state.pop(key) for key in keys})
            outbox = state.pop("outbox_path")
            state = {
                **MlflowTrialLogger(
                    **{key: getattr(spec, key) for key in keys},
                    max_epochs=state["max_epochs"],
                    journal=outbox.parent / JOURNAL,
                    drain_timeout_s=state["drain_timeout_s"],
                    phase=state["phase"],
                    trial_tags=state["trial_tags"],
                ).__dict__
            }
        self.__dict__.update(state)

    @property
    def writer(self) -> MlflowWriter:
        """The writer process of this callback, started at the first use."""
        if self._writer is None:
            self._writer = MlflowWriter(self.spec, self.journal)
        return self._writer

    def setup(self, **info: Any) -> None:
        self._drill = drill_for(self.spec.search_name)
        for run in self._search_runs():
            trial_id = run.tags[TRIAL_TAG]
            self._runs.add(trial_id)
            if run.status in _CLOSED:
                self._closed.add(trial_id)
            if run.tags.get(PHASE_TAG, self.spec.search_name) != self.phase:
                self._elsewhere.add(trial_id)

    def _search_runs(self) -> list[RunRecord]:
        """The search's trial runs in MLflow, with the writes an earlier driver or experiment left
        in the journal applied first; while the store is down, tried again every
        ``RETRY_AFTER_S`` for up to ``drain_timeout_s``."""
        earlier = segments(self.journal)
        writer = self.writer  # started now; its imports overlap the first trials' start
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            applied = True
            if earlier:  # waited for only then: its first attempt may apply them
                applied, answers = writer.wait(0.0)
                self._take(answers)
            if applied:
                try:
                    return trial_records(Tracker(self.spec.tracking_uri), self.spec)
                except Exception as exc:
                    if not is_unavailable(exc) or time.monotonic() >= deadline:
                        raise
            elif time.monotonic() >= deadline:
                raise TrackingError(
                    f"MLflow stayed unavailable for {self.drain_timeout_s:.0f} s (--mlflow-wait) while "
                    f"the writes in {self.journal} waited to be applied: rerun with --resume once it is back"
                )
            log.warning("MLflow unavailable; reading the search's runs again in %.0f s", RETRY_AFTER_S)
            time.sleep(RETRY_AFTER_S)

    def _drill_point(self, point: str) -> None:
        if self._drill is not None:
            self._drill.reached(point)

    def reconcile(self, trials: list[Trial]) -> None:
        """Close the run of every trial that Tune has ended but MLflow has not, from Tune's state;
        KILLED, the run of a trial of this experiment that Tune does not know (started after
        Tune's last saved state)."""
        known = {trial.trial_id for trial in trials}
        for trial in trials:  # what an earlier driver's close freed, if Tune ended the trial so
            freed = self._replayed.pop(trial.trial_id, None)
            if freed and trial.status == Trial.TERMINATED and trial.checkpoint is not None:
                if checkpoint_uri(trial.checkpoint) == freed:
                    self._cleanup.ended(trial.trial_id, freed)
        self._replayed.clear()
        for trial_id in self._runs - known - self._closed - self._elsewhere:
            self._closed.add(trial_id)
            self.writer.put(
                "close", trial_id=trial_id, name="", config={}, status="KILLED", error=LOST, checkpoint=None
            )
        for trial in trials:
            if trial.status in _ENDED and trial.trial_id not in self._closed:
                log.warning("closing the MLflow run of %s, which ended before the driver stopped", trial)
                if "epoch" in trial.last_result:
                    self._put_result(trial, trial.last_result)
                self._end(trial)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self._reconciled:  # the trials of a restored search are known from here on
            self._reconciled = True
            self.reconcile(trials)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._closed.discard(trial.trial_id)
        self._cleanup.forget(trial.trial_id)  # running again: its files are in use
        self._runs.add(trial.trial_id)
        self._started[trial.trial_id] = self.writer.put(
            "start",
            trial_id=trial.trial_id,
            name=str(trial),
            config=trial.config,
            phase=self.phase,
            tags=self._tags(trial),
        )

    def _tags(self, trial: Trial) -> dict[str, str]:
        return dict(self.trial_tags(trial.config)) if self.trial_tags else {}

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self._put_result(trial, result)
        self._drill_point("result")

    def _put_result(self, trial: Trial, result: dict[str, Any]) -> None:
        self.writer.put(
            "result",
            trial_id=trial.trial_id,
            epoch=int(result["epoch"]),
            metrics=reported_metrics(result, _SKIP),
            node_id=result.get(NODE_KEY),
        )

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any
    ) -> None:
        self._cleanup.reported(trial.trial_id, checkpoint_uri(checkpoint))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.writer.put(
            "tags",
            trial_id=trial.trial_id,
            tags={"ray.num_failures": trial.num_failures, "last_error": _error_text(trial)},
        )

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._drill_point("trial-end")
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._take(self.writer.answers())
        if self._cleanup and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CLEANUP_CHECK_S
            self._cleanup.check()

    def wait_for_writes(self, timeout_s: float) -> bool:
        """Wait until every write so far is applied (retrying up to ``timeout_s`` while the store
        is down); whether it is."""
        done, answers = self.writer.wait(timeout_s)
        self._take(answers)
        return done

    def _take(self, answers: list[list[Any]]) -> None:
        """Act on the writer's answers: a closed trial's checkpoint in Tune's storage may go
        (unless the trial started again after that close). A close an earlier driver left (number
        0) waits for :meth:`reconcile`, which knows whether Tune ended that trial."""
        for answer in answers:
            if answer[0] != "freed":
                continue
            _, number, trial_id, checkpoint = answer
            if number == 0:
                self._replayed[trial_id] = checkpoint
            elif number > self._started.get(trial_id, 0):
                self._cleanup.ended(trial_id, checkpoint)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.reconcile(trials)
        drained, answers = self.writer.close(self.drain_timeout_s)
        self._take(answers)
        if not drained:
            log.error(
                "MLflow at %s stayed unavailable for %.0f s after the last trial; the writes not "
                "applied are kept in %s",
                self.spec.tracking_uri,
                self.drain_timeout_s,
                self.journal,
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
        self.writer.put(
            "close",
            trial_id=trial.trial_id,
            name=str(trial),
            config=trial.config,
            status=status,
            error=error,
            checkpoint=checkpoint_uri(checkpoint) if checkpoint else None,
            phase=self.phase,
            tags=self._tags(trial),
        )


def _error_text(trial: Trial) -> str:
    """The tail of the trial's error file (its traceback)."""
    error_file = trial.error_file
    if error_file and Path(error_file).is_file():
        return error_tail(Path(error_file).read_text())
    return "trial failed (no error file)"
