"""ASHA as the search runs it, choosing the next trial to start without a pass over every trial.

Ray Tune asks its scheduler which trial to start at every step of its loop, and Ray's
``FIFOScheduler.choose_trial_to_run`` (which ``ASHAScheduler`` inherits) answers by walking all
the experiment's trials twice. At 2000 trials that walk was the largest cost that grew in the
driver (about 6 ms of CPU per finished trial; docs/performance.md). Here the scheduler keeps the
trials that may still start, in the controller's order, from the hooks Tune calls: every trial
that becomes PENDING is (re)added through ``on_trial_add`` (a new trial, a retried one moved to
the end of the queue, a restored one), and a trial leaves when Tune says it ended (or is seen
TERMINATED or in ERROR). The answer is the one Ray's would be: the first PENDING trial, else
the first PAUSED.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

_ENDED = (Trial.TERMINATED, Trial.ERROR)


class SearchScheduler(ASHAScheduler):
    """``ASHAScheduler`` whose choice of the next trial costs the trials not ended, not all."""

    def __init__(self, **asha: Any) -> None:
        super().__init__(**asha)
        self._startable: dict[Trial, None] = {}  # insertion-ordered, as the controller's list

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_startable": {}}  # trials belong to the controller that runs them

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self._startable.pop(trial, None)  # re-added: now last, as in the controller's list
        self._startable[trial] = None

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self._startable.pop(trial, None)  # a retried trial is added again at once

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._startable.pop(trial, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._startable.pop(trial, None)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        pending = paused = None
        ended = []
        for trial in self._startable:
            if trial.status in _ENDED:  # e.g. restored as ended: no hook says so
                ended.append(trial)
            elif trial.status == Trial.PENDING:
                pending = trial
                break
            elif trial.status == Trial.PAUSED and paused is None:
                paused = trial
        for gone in ended:
            del self._startable[gone]
        return pending if pending is not None else paused
