"""The end-of-search summary from real Tune Result objects, without running a search."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from ray.tune import Result, TuneError

from search.summary import SearchFailed, summarize

METRIC = "segm_AP50"


def result(
    name: str, values: list[float], *, error: Exception | None = None, config: dict | None = None
) -> Result:
    """A trial's Result with ``values`` of the metric at epochs 1, 2, ..."""
    epochs = list(range(1, len(values) + 1))
    frame = pd.DataFrame({"epoch": epochs, METRIC: values}) if values else None
    metrics = {"training_iteration": len(values), "config": config or {"optim.lr": 0.01}}
    return Result(
        metrics=metrics, checkpoint=None, error=error, path=f"/storage/s1/{name}", metrics_dataframe=frame
    )


def test_the_best_trial_has_the_highest_metric_of_any_epoch_and_saved_epochs_are_counted():
    results = [
        result("trial_a", [0.1, 0.5, 0.4], config={"optim.lr": 0.1}),
        result("trial_b", [0.2], config={"optim.lr": 0.2}),
        result("trial_c", [0.3, math.nan, 0.6], config={"optim.lr": 0.3}),
        result("trial_d", [0.6, 0.1, 0.1], config={"optim.lr": 0.4}),
    ]
    summary = summarize(results, metric=METRIC, max_epochs=3, wall_s=120)
    assert summary.best_trial == "trial_c"  # 0.6 at epoch 3, before trial_d's equal 0.6
    assert summary.best_metric == pytest.approx(0.6) and summary.best_config == {"optim.lr": 0.3}
    assert (summary.trials, summary.errors, summary.best_checkpoint) == (4, 0, "none")
    assert (summary.epochs_run, summary.epochs_full, summary.epochs_saved) == (10, 12, 2)
    lines = summary.lines(METRIC)
    assert "best trial: trial_c  segm_AP50 0.6000" in lines
    assert "epochs run: 10 of 12 for every trial to the end (ASHA saved 2, 17%)" in lines


def test_a_failed_trial_counts_but_is_never_the_best():
    """export --best never takes a FAILED run, so the summary's best trial cannot be one either."""
    results = [result("trial_a", [0.9], error=TuneError("boom")), result("trial_b", [0.2])]
    summary = summarize(results, metric=METRIC, max_epochs=1, wall_s=1)
    assert summary.errors == 1 and summary.best_trial == "trial_b"


def test_when_every_trial_failed_the_error_names_the_first_one():
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "cellseg.training.NonFiniteLossError: non-finite loss: loss_mask=nan\n"
    )
    results = [
        result("trial_a", [0.3], error=TuneError(traceback)),
        result("trial_b", [], error=TuneError("RuntimeError: second")),
    ]
    with pytest.raises(SearchFailed) as info:
        summarize(results, metric=METRIC, max_epochs=3, wall_s=1)
    message = str(info.value)
    assert message.startswith("no trial succeeded: 2 of 2 failed")
    assert "in trial_a: cellseg.training.NonFiniteLossError: non-finite loss: loss_mask=nan" in message
    assert "/storage/s1/trial_a/error.txt" in message and "second" not in message


def test_trials_that_never_reported_the_metric_fail_the_search():
    with pytest.raises(SearchFailed, match="no trial reported segm_AP50"):
        summarize([result("trial_a", [])], metric=METRIC, max_epochs=3, wall_s=1)
