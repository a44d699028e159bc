"""A Tune searcher that owns its Optuna study and tells it what happened to every trial.

Tune's public ``Searcher`` interface on one side, Optuna's public ask/tell on the other:
``suggest`` asks the study for a trial and samples the space define-by-run; every result that
carries the metric is reported as that epoch's intermediate value (epochs without validation,
``train.eval_every`` > 1, carry none); the end is told as COMPLETE with the final metric when the
trial reached ``max_epochs``, PRUNED when it ended before (ASHA stopped it), FAIL when it errored
or never reported. Tune hands the result that triggered a stop only to ``on_trial_complete``, so
that last epoch is reported there before the trial is told.

``save``/``restore`` (Tune calls them; ``Tuner.restore`` continues from the last save) keep the
study, its sampler and the live trials. On restore, a trial the study finished after the last save
is not told again, and a trial the study started after it (which Tune will not run) is told FAIL
and its parameters are enqueued again, so that a resumed search neither doubles nor loses a trial.
An errored trial that ``--resume`` runs again (Tune's ``resume_errored``) keeps its FAIL record and,
if it ends without error, gets a second record with its epochs and ending beside it.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher

from cellseg.errors import ConfigError
from search.space import SearchSpace
from search.study_file import open_study_storage
from search.trainable import reached_max_epochs

log = logging.getLogger(__name__)

TRIAL_ATTR = "ray.trial_id"  # Optuna user attribute naming the Tune trial (as MLflow's tag does)
# the study's user attributes: what its values are (the metric, after at most this many epochs)
METRIC_ATTR, EPOCHS_ATTR = "metric", "max_epochs"


class StudySearcher(Searcher):
    """Optuna's sampler (TPE) over a ``SearchSpace``, through an Optuna study this searcher owns."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        metric: str,
        mode: str,
        study_file: Path,
        study_name: str,
        sampler: optuna.samplers.BaseSampler,
        max_epochs: int,
        points_to_evaluate: Sequence[dict[str, Any]] = (),
        prior_trials: Sequence[optuna.trial.FrozenTrial] = (),
        continue_study: bool = False,
    ) -> None:
        """A new study in ``study_file`` (search/study_file.py), with ``prior_trials`` (a warm
        start) added before the first ask; with ``continue_study`` the existing study of that name
        instead (a continued search)."""
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.max_epochs = max_epochs
        try:
            self.study = optuna.create_study(
                storage=open_study_storage(study_file),
                study_name=study_name,
                sampler=sampler,
                pruner=optuna.pruners.NopPruner(),  # ASHA decides; the study records
                direction="maximize" if mode == "max" else "minimize",
                load_if_exists=continue_study,
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise ConfigError(
                f"{study_file}: an Optuna study named {study_name!r} exists already; "
                "choose another search name, or pass --resume to continue it"
            ) from None
        if not continue_study:
            self.study.set_user_attr(METRIC_ATTR, metric)
            self.study.set_user_attr(EPOCHS_ATTR, max_epochs)
        self.study.add_trials(prior_trials)
        for point in points_to_evaluate:
            self.study.enqueue_trial(point)
        self.trials: dict[str, optuna.Trial] = {}  # Tune trial id -> its running Optuna trial
        self.last_step: dict[str, int] = {}  # Tune trial id -> its last reported epoch
        self.failed: dict[str, int] = {}  # Tune trial id -> the number of its FAIL record
        self.rerun: dict[str, dict[int, float]] = {}  # epochs of failed trials --resume runs again

    def suggest(self, trial_id: str) -> dict[str, Any]:
        trial = self.study.ask()
        trial.set_user_attr(TRIAL_ATTR, trial_id)
        self.trials[trial_id] = trial
        return self.space(trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        step = result[TRAINING_ITERATION]
        if self.metric not in result or step <= self.last_step.get(trial_id, 0):
            return  # an epoch without validation, or one reported before
        if trial_id in self.trials:
            self.trials[trial_id].report(result[self.metric], step)
        elif trial_id in self.failed:  # an errored trial that a resumed search runs again
            self.rerun.setdefault(trial_id, {})[step] = float(result[self.metric])
        else:
            return  # told already
        self.last_step[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)  # the epoch that triggered a stop
        self.last_step.pop(trial_id, None)
        state, value = self._ending(result, error)
        if trial_id in self.trials:
            told = self.study.tell(self.trials.pop(trial_id), value, state=state)
            if state == TrialState.FAIL:
                self.failed[trial_id] = told.number
        elif trial_id in self.failed and state != TrialState.FAIL:
            self._record_rerun(trial_id, state, value)

    def _ending(self, result: dict | None, error: bool) -> tuple[TrialState, float | None]:
        """How a trial that ended with ``result`` goes into the study."""
        if error or not result:
            return TrialState.FAIL, None
        if not reached_max_epochs(result, self.max_epochs):
            return TrialState.PRUNED, None
        value = float(result.get(self.metric, math.nan))
        if math.isfinite(value):
            return TrialState.COMPLETE, value
        return TrialState.FAIL, None  # the end without a finite metric: nothing to learn from

    def _record_rerun(self, trial_id: str, state: TrialState, value: float | None) -> None:
        """A failed trial that a resumed search ran again to its end: a new record beside the FAIL."""
        first = self.study.get_trials(deepcopy=False)[self.failed.pop(trial_id)]
        self.study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=first.params,
                distributions=first.distributions,
                user_attrs=first.user_attrs,
                intermediate_values={**first.intermediate_values, **self.rerun.pop(trial_id, {})},
            )
        )

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:  # Tune swaps the file in atomically
            pickle.dump(
                {
                    "study": self.study,
                    "trials": self.trials,
                    "last_step": self.last_step,
                    "failed": self.failed,
                    "rerun": self.rerun,
                },
                out,
            )

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as saved:
            state = pickle.load(saved)
        self.study = state["study"]
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        saved = state["trials"]
        self.trials = {k: t for k, t in saved.items() if not states[t.number].is_finished()}
        self.failed = {
            **state["failed"],
            **{
                k: t.number
                for k, t in saved.items()  # told FAIL
                if states[t.number] == TrialState.FAIL
            },
        }  # after the save
        self.rerun = {k: v for k, v in state["rerun"].items() if k in self.failed}
        self.last_step = {k: v for k, v in state["last_step"].items() if k in self.trials}
        live = {t.number for t in self.trials.values()}
        for orphan in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if orphan.number not in live:  # asked after the last save: Tune does not know it
                self.study.tell(orphan.number, state=TrialState.FAIL)
                self.study.enqueue_trial(dict(orphan.params))
                log.info(
                    "Optuna trial %d started after the last save; its parameters are queued again",
                    orphan.number,
                )
