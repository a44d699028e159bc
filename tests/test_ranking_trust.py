"""How far a search's choice can be trusted, from real Tune Result objects: ASHA's rung fidelity
and the table of the top trials' bootstrap intervals (the full search is in test_search_e2e)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ray.tune import Result
from ray.tune.schedulers import ASHAScheduler

from cellseg.bootstrap import Interval
from search.asha_fidelity import fidelity_lines, rung_epochs, rung_fidelity
from search.trial_intervals import TrialInterval, interval_lines

METRIC = "segm_AP50"


def result(name: str, values: list[float]) -> Result:
    frame = pd.DataFrame({"epoch": range(1, len(values) + 1), METRIC: values})
    return Result(
        metrics={"training_iteration": len(values), "trial_id": name},
        checkpoint=None,
        error=None,
        path=f"/storage/s/{name}",
        metrics_dataframe=frame,
    )


@pytest.mark.parametrize(
    ("grace", "factor", "max_t"), [(1, 3, 6), (1, 2, 3), (1, 3, 9), (2, 2, 16), (1, 3.0, 27), (3, 3, 3)]
)
def test_rung_epochs_are_the_milestones_of_rays_asha(grace, factor, max_t):
    scheduler = ASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=factor)
    milestones = sorted(int(m) for m, _ in scheduler._brackets[0]._rungs if m < max_t)
    assert rung_epochs(grace, factor, max_t) == milestones


def test_a_rung_that_orders_trials_as_the_end_does_correlates_fully():
    finished = [result(f"t{i}", [0.1 * i, 0.05, 0.1 * i + 0.3]) for i in range(6)]
    stopped = result("early", [0.9])  # stopped at the first rung: not counted
    [rung] = rung_fidelity(
        finished + [stopped], metric=METRIC, max_epochs=3, grace_period=1, reduction_factor=3
    )
    assert (rung.epoch, rung.trials, rung.spearman) == (1, 6, pytest.approx(1.0))
    lines = fidelity_lines([rung], reduction_factor=3, max_epochs=3)
    assert lines == [
        "ASHA rung at epoch 1: Spearman +1.00 between the metric there and the final one, over 6 "
        "trials that ran every epoch"
    ]


def test_a_poor_rung_warns_and_suggests_the_next_rung_as_grace_period():
    # epoch 1 reverses the final order and epoch 3 keeps it; the final value is the best epoch (9)
    finished = [result(f"t{i}", [0.6 - 0.1 * i, 0.0, 0.1 * i, *[0.0] * 5, 0.7 + 0.05 * i]) for i in range(5)]
    fidelity = rung_fidelity(finished, metric=METRIC, max_epochs=9, grace_period=1, reduction_factor=3)
    assert [(r.epoch, r.spearman) for r in fidelity] == [(1, pytest.approx(-1.0)), (3, pytest.approx(1.0))]
    lines = fidelity_lines(fidelity, reduction_factor=3, max_epochs=9)
    assert lines[-1].startswith("warning: the order at epoch 1 predicts the final order poorly")
    assert lines[-1].endswith("Suggested: --grace-period 3")
    # with 3 epochs in all, the next rung is the end: no early stopping at all
    [rung] = rung_fidelity(finished, metric=METRIC, max_epochs=3, grace_period=1, reduction_factor=3)
    assert rung.spearman == pytest.approx(-1.0)
    last = fidelity_lines([rung], reduction_factor=3, max_epochs=3)[-1]
    assert last.endswith("Suggested: --grace-period 3 (ASHA then stops no trial)")


def test_too_few_finished_trials_or_equal_scores_give_no_number():
    few = [result(f"t{i}", [0.1 * i, 0.2 * i]) for i in range(4)]
    [rung] = rung_fidelity(few, metric=METRIC, max_epochs=2, grace_period=1, reduction_factor=2)
    assert (rung.trials, rung.spearman) == (4, None)
    [line] = fidelity_lines([rung], reduction_factor=2, max_epochs=2)
    assert "no rank correlation: 4 trials ran every epoch, and fewer than 5 say nothing" in line
    same = [result(f"t{i}", [0.0, 0.1 * i]) for i in range(6)]
    [rung] = rung_fidelity(same, metric=METRIC, max_epochs=2, grace_period=1, reduction_factor=2)
    assert (rung.trials, rung.spearman) == (6, None)
    assert "all 6 trials scored the same" in fidelity_lines([rung], reduction_factor=2, max_epochs=2)[0]


def trial(
    name: str, value: float, samples: list[float], images: tuple[int, ...] = (1, 2, 3)
) -> TrialInterval:
    drawn = np.array(samples)
    low, high = np.percentile(drawn, [2.5, 97.5])
    return TrialInterval(name, name, value, Interval(value, float(low), float(high), 0.95, images, drawn))


def test_the_table_shows_each_interval_and_how_often_a_runner_up_ties_the_best():
    best = trial("trial_a", 0.80, [0.7, 0.8, 0.9, 0.85])
    close = trial("trial_b", 0.78, [0.75, 0.81, 0.8, 0.8])  # >= trial_a in 2 of 4 resamples
    far = trial("trial_c", 0.30, [0.2, 0.3, 0.4, 0.3])
    other_split = trial("trial_d", 0.20, [0.1, 0.2, 0.3, 0.2], images=(4, 5, 6))
    lines = interval_lines([best, close, far, other_split], METRIC)
    assert lines[0] == (
        "top 4 by segm_AP50, 95% interval of segm_AP50 from 4 bootstrap resamples of the 3 "
        "validation images (seed 0):"
    )
    interval = f"[{best.interval.low:.4f}, {best.interval.high:.4f}]"
    assert lines[1].endswith("95% interval        as good as #1")
    assert lines[2] == f"  1  {'trial_a':<20} {0.8:>10.4f}  {interval}"
    assert lines[3].split()[-1] == "50%" and lines[4].split()[-1] == "0%"
    assert lines[5].endswith("]")  # validated on other images: no paired share
    assert lines[6].startswith("note: trial_b scores at least as high as trial_a in 50% of the resamples")
    assert close.metrics(best) == {
        "segm_AP50_ci95_low": close.interval.low,
        "segm_AP50_ci95_high": close.interval.high,
        "segm_AP50_share_at_least_best": 0.5,
    }
    assert not any(line.startswith("note") for line in interval_lines([best, far], METRIC))
    assert interval_lines([best], METRIC, ["trial_x"])[-1] == (
        "no interval for trial_x: no checkpoint kept (--keep-top keeps fewer than --ci-top)"
    )
