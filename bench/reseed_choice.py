"""Does re-seeding the top pick the truly better configuration more often than one run does?

A simulated search whose truth is known: configuration ``best`` has mean AP50 0.80, ``runner-up``
0.77 (``--means``), and every training adds seed noise (normal, ``--noise`` 0.04: AP50 on a few
dozen validation images moves by several points with the seed). The cheap "trainable" draws a
run's AP50 from its configuration's mean and its own seed, so a repeat with another seed is
another draw. Each trial is an MLflow run record shaped as the search writes it, and both choices
go through the real code: one run per configuration ranked by ``cellseg.best_run`` (what
``export --best`` does without re-seeding), and ``search.reseed.plan_repeats`` (``--reseed-top K
--reseeds S``) followed by ``cellseg.best_run``'s ranking by mean over seeds. Over ``--searches``
simulated searches it prints how often each picks ``best``, with a 95 % interval.

    python bench/reseed_choice.py [--tiny] [--means 0.80,0.77] [--noise 0.04] [--reseeds 1,2,4]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import common
from cellseg.best_run import groups
from cellseg.tracking import PARENT_TAG, SEARCH_TAG, SOURCE_TAG, RunRecord, best_metric_key
from search.reseed import SEED_TAG, plan_repeats
from search.trial_runs import TRIAL_TAG

METRIC = "segm_AP50"
SEED0 = 0  # the search's train.seed


def outcome(mean: float, noise: float, search: int, config: int, seed: int) -> float:
    """The AP50 of one training: its configuration's mean plus the noise of (search, seed)."""
    return mean + random.Random(f"{search}/{config}/{seed}").gauss(0.0, noise)


def trial_record(search: int, index: int, value: float, tags: dict[str, str]) -> RunRecord:
    return RunRecord(
        run_id=f"s{search}-r{index}",
        name=f"trial {index}",
        status="FINISHED",
        start_time=float(index),
        tags={SOURCE_TAG: "search", PARENT_TAG: f"s{search}", **tags},
        params={"train.metric": METRIC},
        metrics={best_metric_key(METRIC): value},
    )


def chosen_config(records: list[RunRecord], search: int, config_of: dict[str, int]) -> int:
    """The configuration of the run ``export --best`` takes (cellseg.best_run's ranking)."""
    parent = RunRecord(f"s{search}", "parent", "FINISHED", -1.0, {SEARCH_TAG: f"s{search}"}, {}, {})
    [group] = groups([parent, *records])
    return config_of[group.candidates[0].configuration]


def simulate(search: int, means: list[float], noise: float, top: int, reseeds: int) -> tuple[int, int]:
    """The configuration chosen from one run each, and after re-seeding the ``top``."""
    records = [
        trial_record(search, i, outcome(m, noise, search, i, SEED0), {TRIAL_TAG: f"t{i}"})
        for i, m in enumerate(means)
    ]
    config_of = {r.run_id: i for i, r in enumerate(records)}
    single = chosen_config(records, search, config_of)
    repeats = plan_repeats(
        records,
        {f"t{i}": {"index": i} for i in range(len(means))},
        top=top,
        reseeds=reseeds,
        base_seed=SEED0,
        base_split_seed=0,
        vary_split=False,
    )
    for n, repeat in enumerate(repeats, start=len(records)):
        config = repeat.config["index"]
        value = outcome(means[config], noise, search, config, int(repeat.tags[SEED_TAG]))
        records.append(trial_record(search, n, value, repeat.tags))
    return single, chosen_config(records, search, config_of)


def interval(hits: int, n: int) -> str:
    """A 95 % Wilson interval for the share ``hits / n``, in percent."""
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * (centre - half):.1f}-{100 * (centre + half):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="200 simulated searches instead of --searches")
    p.add_argument("--searches", type=int, default=4000, help="simulated searches per setting")
    p.add_argument(
        "--means", default="0.80,0.77", help="true mean AP50 per configuration, the first the best"
    )
    p.add_argument("--noise", type=float, default=0.04, help="standard deviation of AP50 over seeds")
    p.add_argument("--top", type=int, default=2, help="--reseed-top K")
    p.add_argument("--reseeds", default="1,2,4", help="--reseeds S values to compare")
    args = p.parse_args()
    means = [float(m) for m in args.means.split(",")]
    if max(means) != means[0]:
        raise SystemExit("--means: give the truly best configuration first")
    searches = 200 if args.tiny else args.searches
    print(common.machine())
    print(f"{searches} searches, true means {means}, seed noise {args.noise}, --reseed-top {args.top}")
    start = time.perf_counter()
    single_hits, rows, shares = 0, [], {}
    for reseeds in [int(s) for s in args.reseeds.split(",")]:
        outcomes = [simulate(s, means, args.noise, args.top, reseeds) for s in range(searches)]
        single_hits = sum(single == 0 for single, _ in outcomes)
        hits = sum(reseeded == 0 for _, reseeded in outcomes)
        shares[reseeds] = hits / searches
        extra = min(args.top, len(means)) * reseeds
        rows.append([f"--reseeds {reseeds}", extra, f"{100 * hits / searches:.1f}", interval(hits, searches)])
    rows.insert(
        0, ["one run each", 0, f"{100 * single_hits / searches:.1f}", interval(single_hits, searches)]
    )
    common.print_table(["choice", "extra trainings", "picks the best %", "95 % interval"], rows)
    print(f"{time.perf_counter() - start:.1f} s")
    first = min(shares)
    common.print_ratio(
        f"picks the best, --reseeds {first} vs one run", shares[first] / (single_hits / searches)
    )


if __name__ == "__main__":
    main()
