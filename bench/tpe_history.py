"""TPE's cost per ask as finished trials pile up, plain and over a bounded history.

Optuna's TPE fits one density to its best trials and one to every other finished trial at each
ask, so its cost grows with the study; the search asks it through ``BoundedHistorySampler``
(search/bounded_history.py), which shows it the whole study up to ``--recent + 2 * --best``
finished trials and past that the best completed and pruned ones, the ``--recent`` others last
to finish and the running ones. This benchmark asks ``--trials`` trials of the demo space
(``trials/space_demo.yaml``) without Ray, each valued by the formula of ``bench/driver_scale.py``'s
trials (``common.final_value``, best 0.76) with its epochs' noise and pruned as ASHA prunes (at
epochs 1, 3 and 9: below the two-thirds quantile of what that epoch has seen), once with plain
``TPESampler`` and once with the bounded one, each in its own process at the same time, over the
same ``--seeds``. It prints the CPU time per ask in three buckets of trials (the second
twentieth, the sixth and the last tenth) and, per seed, the best true value among the completed
trials; then the ratio of the bounded sampler's last-bucket cost to TPE's, and of their mean
regrets (0.76 less the best value).

    python bench/tpe_history.py [--tiny] [--trials N] [--seeds 0 1 ...] [--recent R] [--best B]
"""

from __future__ import annotations

import random
import statistics
import time
import zlib
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

import common
from cellseg.config import load_config
from search.bounded_history import BoundedHistorySampler
from search.space import load_space

VARIANTS = ("tpe", "bounded")
RUNGS = (1, 3, 9)
EPOCHS = 24


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
