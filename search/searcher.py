"""OptunaSearch that tells Optuna the truth about trials ASHA stopped early.

Ray's OptunaSearch marks a trial COMPLETE whenever its last result carries the metric, so a trial
that ASHA stopped after one epoch enters TPE as a finished trial with its one-epoch score. Here a
trial that ends, without error, before ``max_epochs`` is told to Optuna as PRUNED, with its per-epoch
intermediate values. Tune hands the result that triggered a stop (or the end) only to
``on_trial_complete``, so that last epoch is reported here before the trial is told. Epochs
without validation (``train.eval_every`` > 1) report no metric and are not told.
"""
from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch with ASHA-stopped trials recorded as PRUNED instead of COMPLETE."""

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:  # epochs without validation (train.eval_every > 1) have none
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or error or not result:
            super().on_trial_complete(trial_id, result, error)
            return
        ot_trial = self._ot_trials[trial_id]
        step = result[TRAINING_ITERATION]
        if self.metric in result:
            ot_trial.report(result[self.metric], step)
        if step >= self.max_epochs:
            super().on_trial_complete(trial_id, result, error)
            return
        try:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # Optuna rejects a second tell; the trial is recorded already
            log.warning("could not record trial %s as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)
