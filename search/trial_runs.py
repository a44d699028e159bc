"""The MLflow side of a search's trials: the writes the driver decides, applied to the store.

The Tune callback (search/mlflow_callback.py) decides what to write; :class:`TrialRuns` carries out
each write, one operation at a time, in the MLflow writer process (search/mlflow_writer.py). An
operation is a name and plain arguments: ``start`` creates a trial's child run (or reopens it),
``result`` logs an epoch, ``tags`` sets tags, ``close`` logs the trial's outcome, uploads its
``best.pt`` and ends its run. Operations may be applied again after a crash, so each is
idempotent: a run is found by its trial id, an epoch already logged is skipped, an upload
overwrites.

With ``keep_top`` K, only the K best ended trials (by ``cellseg.best_run``'s rule, the one
``export --best`` ranks by) keep ``checkpoint/best.pt`` in MLflow: a trial not among them when it
ends never uploads it, a trial pushed out of the top K later loses it; either run keeps metrics,
params and config and gets the tag ``cellseg.checkpoint_dropped``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.tune import Checkpoint

from cellseg.best_run import Candidate, candidate, export_order, has_checkpoint
from cellseg.checkpoint import BEST, CheckpointError, load_checkpoint
from cellseg.config import Config, apply_overrides, config_from_dict, flatten
from cellseg.data import dataset_fingerprint
from cellseg.tracking import CHECKPOINT_DROPPED_TAG, PARENT_TAG, SOURCE_TAG, RunRecord, Tracker
from search.driver_drill import DriverDrill

log = logging.getLogger(__name__)

TRIAL_TAG = "ray.trial_id"
SEARCHED_KEYS_TAG = "cellseg.searched_keys"  # the keys a trial's config sampled, comma-separated
PHASE_TAG = "cellseg.phase"  # the Tune experiment the trial ran in (untagged: the search's first)


@dataclass(frozen=True)
class RunsSpec:
    """Where a search's trial runs go and how they are kept (plain values: sent as JSON)."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    base: dict[str, Any]  # the search's base config, as a dict
    metric: str
    keep_top: int = 0  # 0: every ended trial keeps its checkpoint
    search_name: str = ""

    def trial_config(self, config: dict[str, Any]) -> Config:
        """The full config of a trial that sampled ``config``."""
        return apply_overrides(config_from_dict(self.base), config)


def trial_records(tracker: Tracker, spec: RunsSpec) -> list[RunRecord]:
    """The child runs of the search's parent run that belong to a Tune trial."""
    return [
        run
        for run in tracker.records(spec.experiment, f"tags.`{PARENT_TAG}` = '{spec.parent_run_id}'")
        if run.tags.get(TRIAL_TAG)
    ]


class EndedTrials:
    """A search's exportable ended trials, indexed so that ranking them for ``keep_top`` costs the
    trials that keep a checkpoint and the runs of their configurations, not every ended trial."""

    def __init__(self) -> None:
        self.runs: dict[str, Candidate] = {}  # run id -> the ended trial
        self.keeping: dict[str, None] = {}  # run ids whose checkpoint is kept
        self.by_configuration: dict[str, dict[str, None]] = {}  # configuration -> its run ids

    def put(self, ended: Candidate) -> None:
        """Add ``ended``, or replace its run's entry."""
        run_id = ended.record.run_id
        if run_id in self.runs:
            self.by_configuration[self.runs[run_id].configuration].pop(run_id, None)
        self.runs[run_id] = ended
        self.by_configuration.setdefault(ended.configuration, {})[run_id] = None
        if has_checkpoint(ended.record):
            self.keeping[run_id] = None
        else:
            self.keeping.pop(run_id, None)

    def contenders(self, extra: Candidate | None = None) -> list[Candidate]:
        """The ended trials (``extra`` in place of its run's entry, or added) whose order decides
        which checkpoints stay: those that keep one, and every run of their configurations (a
        re-seeded configuration ranks by its mean). The order among them is the order over all
        ended trials, since a run's rank depends only on its configuration's runs."""
        configurations = {self.runs[run_id].configuration for run_id in self.keeping}
        if extra is not None and has_checkpoint(extra.record):
            configurations.add(extra.configuration)
        chosen = {
            run_id: self.runs[run_id]
            for configuration in configurations
            for run_id in self.by_configuration.get(configuration, {})
        }
        if extra is not None:
            chosen.pop(extra.record.run_id, None)
            if extra.configuration in configurations:
                chosen[extra.record.run_id] = extra
        return list(chosen.values())


class TrialRuns:
    """Applies the operations of a search's trials to MLflow, knowing the runs it has."""

    def __init__(self, spec: RunsSpec, tracker: Tracker | None = None) -> None:
        self.spec = spec
        self.tracker = tracker or Tracker(spec.tracking_uri)
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.logged_epoch: dict[str, int] = {}
        self.node: dict[str, str] = {}  # trial id -> the node its run's tag names
        self.start_tried: set[str] = set()  # trials whose run creation was attempted
        self.ended = EndedTrials()  # this search's exportable ended trials
        self.drill: DriverDrill | None = None  # fired at a close's upload and end

    def load(self) -> None:
        """Learn the runs the search has already (a restored search)."""
        for run in trial_records(self.tracker, self.spec):
            trial_id = run.tags[TRIAL_TAG]
            self.runs[trial_id] = run.run_id
            self.logged_epoch[trial_id] = self.tracker.last_step(run.run_id, "epoch")
            ended = candidate(run)
            if ended is not None:
                self.ended.put(ended)

    def apply(self, op: str, /, **kwargs: Any) -> str | None:
        """Carry out one operation; for a close that leaves Tune's copy of the trial's checkpoint
        unneeded, that checkpoint's URI."""
        apply = {
            "start": self.start,
            "result": self.result,
            "tags": self.tags,
            "close": self.close,
        }[op]
        return apply(**kwargs)

    def tags(self, trial_id: str, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(self.runs[trial_id], tags)

    def start(
        self,
        trial_id: str,
        name: str,
        config: dict[str, Any],
        phase: str = "",
        tags: dict[str, str] | None = None,
    ) -> None:
        if trial_id in self.runs:
            self.tracker.reopen_run(self.runs[trial_id])
            return
        if trial_id in self.start_tried:  # a retry: the run may have been created just before
            found = self.tracker.records(  # the store went away, the answer lost
                self.spec.experiment,
                f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.spec.parent_run_id}'",
            )
            if found:
                self.runs[trial_id] = found[0].run_id
                return
        self.start_tried.add(trial_id)
        cfg = self.spec.trial_config(config)
        self.runs[trial_id] = self.tracker.start_run(
            self.spec.experiment,
            name,
            params=flatten(cfg),
            parent_run_id=self.spec.parent_run_id,
            tags={
                TRIAL_TAG: trial_id,
                PHASE_TAG: phase or self.spec.search_name,
                SOURCE_TAG: "search",
                SEARCHED_KEYS_TAG: ",".join(sorted(config)),
                **(tags or {}),
            },
            dataset=dataset_fingerprint(cfg.data),
        )

    def result(self, trial_id: str, epoch: int, metrics: dict[str, float], node_id: str | None) -> None:
        if epoch <= self.logged_epoch.get(trial_id, 0):  # repeated by a trial restored from
            return  # an older checkpoint
        moved = bool(node_id) and self.node.get(trial_id) != node_id  # the tag changes once per node
        self.tracker.log_metrics(
            self.runs[trial_id], metrics, step=epoch, tags={"ray.node_id": node_id} if moved else None
        )
        if moved:
            self.node[trial_id] = node_id
        self.logged_epoch[trial_id] = epoch

    def close(
        self,
        trial_id: str,
        name: str,
        config: dict[str, Any],
        status: str,
        error: str | None,
        checkpoint: str | None,
        phase: str = "",
        tags: dict[str, str] | None = None,
    ) -> str | None:
        if trial_id not in self.runs:  # failed before it started (e.g. its worker died)
            self.start(trial_id, name, config, phase, tags)
        run_id = self.runs[trial_id]
        if error is not None:
            self.tracker.set_error(run_id, error)
        if checkpoint is None:
            self.tracker.end_run(run_id, status)
            self._reached("closed")
            return None
        filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:  # a replayed close
            log.warning("%s: its checkpoint %s is gone; the run is closed without it", trial_id, checkpoint)
            self.tracker.end_run(run_id, status)
            self._reached("closed")
            return None
        with Checkpoint(path, filesystem).as_directory() as directory:
            try:
                best = float(load_checkpoint(Path(directory) / BEST)["metrics"][self.spec.metric])
            except (CheckpointError, KeyError):
                best = float("nan")
            self.tracker.log_outcome(
                run_id, Path(directory), self.spec.trial_config(config), best, checkpoint=False
            )
            ended = self._rank_ended(run_id, status)
            if ended is None or has_checkpoint(ended.record):
                self.tracker.log_checkpoint(run_id, Path(directory))
        self._reached("upload")
        self.tracker.end_run(run_id, status)
        self._reached("closed")
        if ended is not None:
            self.ended.put(ended)
            if has_checkpoint(ended.record):  # it may push another out
                for out in drop_beyond_top(self.tracker, self.ended.contenders(), self.spec.keep_top):
                    self.ended.put(replace(self.ended.runs[out.record.run_id], record=out.record))
        return None if status == "FAILED" else checkpoint  # a failed trial may still be restarted

    def _reached(self, point: str) -> None:
        if self.drill is not None:
            self.drill.reached(point)

    def _rank_ended(self, run_id: str, status: str) -> Candidate | None:
        """With ``keep_top``, rank the run being closed as ``status`` among the search's ended
        trials; when it is not among the ``keep_top`` best, drop its checkpoint before it would be
        uploaded (only a tag, unless an earlier close of the run uploaded one). The run as ranked;
        None when nothing is kept or the run cannot be exported."""
        if not self.spec.keep_top:
            return None
        found = candidate(replace(self.tracker.record(run_id), status=status))
        if found is None:
            return None
        beyond, reason = beyond_top(self.ended.contenders(found), self.spec.keep_top)
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
