"""TPE's cost per ask as finished trials pile up, and what bounding its history would cost.

What still grows in the search driver at 1000 trials is Optuna's TPE sampler: at every ask it
fits one density to its best trials and one to every other finished trial (docs/performance.md).
This benchmark asks ``--trials`` trials of the demo space (``trials/space_demo.yaml``) without
Ray, each valued by the formula of ``bench/driver_scale.py``'s trials (``common.final_value``, best
0.76) with its epochs' noise and
pruned as ASHA prunes (at epochs 1, 3 and 9: below the two-thirds quantile of what that epoch has
seen), once with Optuna's ``TPESampler`` as the search uses it and once with the same sampler
shown a bounded history: all the trials while at most ``--recent + 2 * --best`` have finished,
past that the ``--best`` completed and pruned (which hold TPE's below set, at most 25 trials),
the ``--recent`` others last to finish and the running ones. Both run at the same time, each in its own
process, over the same ``--seeds``. It prints the CPU time per ask in three buckets of trials
(the second twentieth, the sixth and the last tenth) and, per seed, the best true value among
the completed trials; then the ratio of the bounded sampler's last-bucket cost to TPE's, and of
their mean regrets (0.76 less the best value).

    python bench/tpe_history.py [--tiny] [--trials N] [--seeds 0 1 ...] [--recent R] [--best B]
"""

from __future__ import annotations

import copy
import heapq
import random
import statistics
import time
import zlib
from collections import deque
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

import common
from cellseg.config import load_config
from search.space import load_space

VARIANTS = ("tpe", "bounded")
RUNGS = (1, 3, 9)
EPOCHS = 24
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class BoundedHistory:
    """Which trials TPE is shown, kept up to date from the trials not finished at the last look.
    The recent trials are counted apart from the best ones, so that past the bound TPE always sees
    at least ``recent + 2 * best`` finished trials and takes as many below as over the study."""

    def __init__(self, *, recent: int, best: int) -> None:
        self.recent, self.best = recent, best
        self.seen = 0
        self.unfinished: set[int] = set()
        self.finished = 0
        self.best_completed: list[tuple[float, int]] = []  # min-heaps of (rank, number)
        self.best_pruned: list[tuple[tuple[int, float], int]] = []
        self.last_finished: deque[int] = deque(maxlen=recent + 2 * best)

    def __call__(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        self.unfinished.update(range(self.seen, len(trials)))
        self.seen = len(trials)
        for number in sorted(self.unfinished):
            trial = trials[number]
            if trial.state.is_finished():
                self.unfinished.discard(number)
                if trial.state in FINISHED:
                    self._add(trial)
        if self.finished <= self.recent + 2 * self.best:
            return list(trials)
        kept = {number for _, number in self.best_completed + self.best_pruned}  # type: ignore[operator]
        recent = [n for n in reversed(self.last_finished) if n not in kept][: self.recent]
        kept.update(recent)
        kept.update(n for n in self.unfinished if trials[n].state == TrialState.RUNNING)
        return [trials[number] for number in sorted(kept)]

    def _add(self, trial: FrozenTrial) -> None:
        self.finished += 1
        self.last_finished.append(trial.number)
        if trial.state == TrialState.COMPLETE:
            rank: Any = trial.value
            heap: list = self.best_completed
        elif trial.intermediate_values:  # TPE's order: the last epoch reached, then the value there
            rank, heap = max(trial.intermediate_values.items()), self.best_pruned
        else:
            return
        if len(heap) < self.best:
            heapq.heappush(heap, (rank, trial.number))
        elif (rank, trial.number) > heap[0]:
            heapq.heapreplace(heap, (rank, trial.number))


class HistoryView:
    """A study whose trials, as TPE reads them (``Study._get_trials``), are a bounded history."""

    def __init__(self, study: Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


class BoundedHistorySampler(optuna.samplers.BaseSampler):
    """A TPE sampler asked over a ``BoundedHistory`` of a maximized study (one view per ask)."""

    def __init__(self, base: optuna.samplers.TPESampler, *, recent: int, best: int) -> None:
        self.base = base
        self.history = BoundedHistory(recent=recent, best=best)
        self.view: tuple[int, Any] = (-1, None)

    def _view(self, study: Study, trial: FrozenTrial) -> Any:
        if self.view[0] != trial.number:
            trials = study._get_trials(deepcopy=False, use_cache=False)
            self.view = trial.number, HistoryView(study, self.history(trials))
        return self.view[1]

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]) -> dict:
        return self.base.sample_relative(self._view(study, trial), trial, space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, name: str, distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(self._view(study, trial), trial, name, distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)


def search(variant: str, seed: int, args: Any) -> dict[str, Any]:
    """One simulated search: the CPU seconds of each ask and the best true value completed."""
    space = load_space(common.TRIALS / "space_demo.yaml", load_config(common.TRIALS / "demo.yaml"))
    tpe = optuna.samplers.TPESampler(seed=seed)
    sampler = tpe if variant == "tpe" else BoundedHistorySampler(tpe, recent=args.recent, best=args.best)
    study = optuna.create_study(direction=StudyDirection.MAXIMIZE, sampler=sampler)
    seen: dict[int, list[float]] = {rung: [] for rung in RUNGS}
    ask_s, best = [], -1.0
    for _ in range(args.trials):
        start = time.process_time()
        trial = study.ask()
        config = space(trial)
        ask_s.append(time.process_time() - start)
        final = common.final_value(config)
        rng = random.Random(zlib.crc32(repr(sorted(config.items())).encode()))
        for epoch in range(1, EPOCHS + 1):
            value = common.epoch_value(final, epoch, rng)
            trial.report(value, epoch)
            if epoch in seen:
                seen[epoch].append(value)
                ranked = sorted(seen[epoch])
                if len(ranked) >= 3 and value < ranked[len(ranked) * 2 // 3]:
                    study.tell(trial, state=TrialState.PRUNED)
                    break
        else:
            study.tell(trial, value)
            best = max(best, final)
    return {"ask_s": ask_s, "best": best}


def buckets(trials: int) -> list[tuple[int, int]]:
    return [(trials // 20, trials // 10), (trials // 4, 3 * trials // 10), (9 * trials // 10, trials)]


def run_variant(args: Any) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    common.emit_result({str(seed): search(args.variant, seed, args) for seed in args.seeds})


def main() -> None:
    parser = common.make_parser(__doc__.splitlines()[0], VARIANTS)
    parser.add_argument("--trials", type=int, default=1000, help="trials per search")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(15)), help="TPE seeds")
    parser.add_argument("--recent", type=int, default=200, help="recent trials a bounded TPE sees")
    parser.add_argument("--best", type=int, default=25, help="best completed and best pruned it sees")
    args = parser.parse_args()
    if args.tiny:
        args.trials, args.seeds, args.recent, args.best = 120, [0], 20, 5
    if args.variant:
        run_variant(args)
        return
    print(common.machine())
    flags = ["--trials", str(args.trials), "--recent", str(args.recent), "--best", str(args.best)]
    flags += ["--seeds", *map(str, args.seeds)]
    results = dict(zip(VARIANTS, common.run_variants(__file__, [[*flags, "--variant", v] for v in VARIANTS])))
    spans = buckets(args.trials)
    rows, cost, regret = [], {}, {}
    for variant, by_seed in results.items():
        for seed, result in by_seed.items():
            ms = [1000 * statistics.fmean(result["ask_s"][a:b]) for a, b in spans]
            rows.append([variant, seed, *ms, result["best"]])
        cost[variant] = statistics.fmean(
            1000 * statistics.fmean(r["ask_s"][spans[-1][0] :]) for r in by_seed.values()
        )
        regret[variant] = statistics.fmean(common.BEST_FINAL - r["best"] for r in by_seed.values())
    names = [f"ask ms, trials {a + 1}-{b}" for a, b in spans]
    common.print_table(["sampler", "seed", *names, "best value"], rows)
    for variant in VARIANTS:
        growth = statistics.fmean(r[4] / r[3] for r in rows if r[0] == variant)
        print(
            f"{variant}: last bucket {cost[variant]:.1f} ms per ask, {growth:.2f}x the second; "
            f"mean regret {regret[variant]:.4f}"
        )
    common.print_ratio("bounded/tpe ask CPU in the last bucket", cost["bounded"] / cost["tpe"])
    if regret["tpe"] > 0:
        common.print_ratio("bounded/tpe mean regret", regret["bounded"] / regret["tpe"])


if __name__ == "__main__":
    main()
