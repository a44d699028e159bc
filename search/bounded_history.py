"""Optuna's TPE over a bounded history, so that its fit at each ask stops growing with the study.

TPE fits two densities at every ask: one to its "below" trials (the best tenth, at most 25, the
completed ones first, then the pruned ones that reached the latest epoch) and one to every other
finished trial, so its cost grows with each finished trial. ``BoundedHistorySampler`` shows TPE
the whole study while at most ``recent + 2 * best`` trials have finished, so that it is exactly
TPE there. Past that, TPE sees the ``best`` completed trials by value, the ``best`` pruned ones by
the epoch they reached and then their value there, the ``recent`` other trials last to finish,
and the running ones (TPE's constant liar), topped up with more of the last to finish so that
it sees ``recent + 2 * best`` finished trials. Its below set is then the one it would take from
the whole study; only the other density is fitted to recent trials (docs/performance.md: the cost of
an ask flat past the bound, best values a mean 0.0015 lower on simulated searches of 1000
trials, ``bench/tpe_history.py``).

TPE reads the trials through ``Study._get_trials``, the one private name this rests on
(``HistoryView``); tests/test_bounded_history.py fails when TPE stops reading them through it.
"""

from __future__ import annotations

import copy
import heapq
from collections import deque
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class BoundedHistory:
    """Which of a study's trials TPE is shown, kept up to date as they finish. It holds trial
    numbers only and looks again only at the trials that had not finished at its last look."""

    def __init__(self, *, recent: int, best: int) -> None:
        self.recent, self.best = recent, best
        self.seen = 0  # trials numbered below this were looked at
        self.unfinished: set[int] = set()  # of those, the ones not finished at the last look
        self.finished = 0
        self.best_completed: list[tuple[float, int]] = []  # min-heaps of (rank, -number)
        self.best_pruned: list[tuple[tuple[int, float], int]] = []
        self.last_finished: deque[int] = deque(maxlen=recent + 2 * best)

    def __call__(self, trials: Sequence[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
        """What TPE is shown of ``trials`` (a study's, in number order), in number order."""
        self.unfinished.update(range(self.seen, len(trials)))
        self.seen = len(trials)
        sign = 1.0 if direction == StudyDirection.MAXIMIZE else -1.0
        for number in sorted(self.unfinished):
            trial = trials[number]
            if trial.state.is_finished():
                self.unfinished.discard(number)
                if trial.state in FINISHED:
                    self._add(trial, sign)
        if self.finished <= self.recent + 2 * self.best:
            return list(trials)
        kept = {-negated for _, negated in self.best_completed}
        kept.update(-negated for _, negated in self.best_pruned)
        # as many others as make recent + 2 * best finished trials: TPE's below set (a tenth, at
        # most 25) is then as large as over the whole study
        others = self.recent + 2 * self.best - len(kept)
        kept.update([n for n in reversed(self.last_finished) if n not in kept][:others])
        kept.update(n for n in self.unfinished if trials[n].state == TrialState.RUNNING)
        return [trials[number] for number in sorted(kept)]

    def _add(self, trial: FrozenTrial, sign: float) -> None:
        self.finished += 1
        self.last_finished.append(trial.number)
        # heaps of (rank, -number): on a tie the earlier trial ranks higher, as in TPE's stable sort
        if trial.state == TrialState.COMPLETE:
            _keep_largest(self.best_completed, (sign * trial.value, -trial.number), self.best)
        elif trial.intermediate_values:  # TPE's order: the last epoch reached, then the value there
            step, value = max(trial.intermediate_values.items())
            rank = (step, sign * value if value == value else -float("inf"))  # NaN last
            _keep_largest(self.best_pruned, (rank, -trial.number), self.best)


def _keep_largest(heap: list, item: tuple, size: int) -> None:
    """Push ``item`` on the min-heap ``heap``, which keeps the ``size`` largest items pushed."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif size and item > heap[0]:
        heapq.heapreplace(heap, item)


class HistoryView:
    """A study whose trials, as TPE reads them (``Study._get_trials``), are a bounded history;
    everything else (storage, directions) is the study's own."""

    def __init__(self, study: Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_study", "_trials"):  # copy, pickle: not the study's
            raise AttributeError(name)
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


class BoundedHistorySampler(optuna.samplers.BaseSampler):
    """``base`` (a TPE sampler) asked over a ``BoundedHistory`` of a single-objective study."""

    def __init__(self, base: optuna.samplers.TPESampler, *, recent: int = 200, best: int = 25) -> None:
        self.base = base
        self.history = BoundedHistory(recent=recent, best=best)
        self._view: tuple[int, Any] = (-1, None)  # (trial number, its view): one per ask

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_view": (-1, None)}  # the searcher's checkpoint pickles the study

    def _history(self, study: Study, trial: FrozenTrial) -> Any:
        if self._view[0] != trial.number:
            trials = study._get_trials(deepcopy=False, use_cache=False)
            self._view = trial.number, HistoryView(study, self.history(trials, study.direction))
        return self._view[1]

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)  # incremental over the study

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.base.sample_relative(self._history(study, trial), trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(
            self._history(study, trial), trial, param_name, param_distribution
        )

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
