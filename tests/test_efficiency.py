"""The search's useful share from real Tune Result objects, and the trial slots it divides by."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.tune import Result

from search.efficiency import efficiency, trial_slots

T0 = 1_780_000_000


def result(rows: list[tuple[int, float, float, float]]) -> Result:
    """A trial's Result with one (timestamp, train s, val s, Tune's iteration s) row per epoch."""
    frame = pd.DataFrame(rows, columns=["timestamp", "epoch_train_s", "epoch_val_s", "time_this_iter_s"])
    return Result(metrics={}, checkpoint=None, error=None, path="/s/trial", metrics_dataframe=frame)


def test_useful_share_sums_training_and_validation_of_every_trial_over_wall_time_and_slots():
    results = [
        result([(T0 + 10, 30.0, 10.0, 45.0), (T0 + 50, 30.0, 10.0, 42.0)]),
        result([(T0 + 20, 20.0, 0.0, 28.0)]),
        Result(metrics={}, checkpoint=None, error=None, path="/s/failed", metrics_dataframe=None),
    ]
    spent = efficiency(results, wall_s=100.0, slots=2, since=T0)
    assert spent.busy_s == pytest.approx(100.0) and spent.trial_s == pytest.approx(115.0)
    assert spent.useful_share == pytest.approx(0.5) and spent.trial_share == pytest.approx(0.575)
    assert spent.metrics() == {
        "useful_share": pytest.approx(0.5),
        "trial_time_share": pytest.approx(0.575),
        "trial_busy_s": pytest.approx(100.0),
        "trial_slots": 2,
    }
    assert spent.line().startswith("useful share: 50.0% (trials trained and validated 100 s in 2 slot(s)")


def test_a_resumed_search_counts_only_the_epochs_of_its_own_session():
    results = [result([(T0 - 100, 30.0, 10.0, 45.0), (T0 + 5, 20.0, 5.0, 30.0)])]
    assert efficiency(results, wall_s=50.0, slots=1, since=T0).busy_s == pytest.approx(25.0)


@pytest.mark.parametrize(
    "cluster, per_trial, max_concurrent, num_samples, slots",
    [
        ({"CPU": 2.0}, {"CPU": 1.0, "GPU": 0.0}, 0, 40, 2),  # the CPU demo
        ({"CPU": 64.0, "GPU": 4.0}, {"CPU": 4.0, "GPU": 0.5}, 0, 40, 8),  # two trials per GPU
        ({"CPU": 64.0, "GPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}, 3, 40, 3),  # --max-concurrent
        ({"CPU": 2.0}, {"CPU": 1.0, "GPU": 0.0}, 0, 1, 1),  # one trial
        ({"CPU": 2.0}, {"CPU": 4.0, "GPU": 0.0}, 0, 5, 1),  # nothing fits: still one
    ],
)
def test_trial_slots(cluster, per_trial, max_concurrent, num_samples, slots):
    assert trial_slots(cluster, per_trial, max_concurrent, num_samples) == slots
