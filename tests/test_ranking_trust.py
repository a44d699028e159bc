"""How far a search's choice can be trusted, from real Tune Result objects, a real ASHAScheduler
and a real MLflow store: ASHA's rung fidelity and the table of the top trials' bootstrap intervals
(the full search is in test_search_e2e)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ray.tune import Result
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cellseg.best_run import ranked_candidates
from cellseg.bootstrap import Interval
from cellseg.checkpoint import make_state, save_checkpoint
from cellseg.commands import checkpoint_interval
from cellseg.config import apply_overrides, load_config
from cellseg.model import build_model
from cellseg.tracking import PARENT_TAG, REPEAT_TAG, SOURCE_TAG, Tracker
from search.asha_fidelity import fidelity_lines, rung_epochs, rung_fidelity
from search.trial_intervals import TrialInterval, interval_lines, interval_runs
from search.trial_runs import drop_beyond_top

METRIC = "segm_AP50"
TRIALS = Path(__file__).resolve().parents[1] / "trials"
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def result(name: str, values: list[float]) -> Result:
    frame = pd.DataFrame({"epoch": range(1, len(values) + 1), METRIC: values})
    return Result(
        metrics={"training_iteration": len(values), "trial_id": name},
        checkpoint=None,
        error=None,
        path=f"/storage/s/{name}",
        metrics_dataframe=frame,
    )


def asha_decides_at(grace: int, factor: float, max_t: int, epoch: int) -> bool:
    """Whether Ray's ASHAScheduler stops a trial at ``epoch`` whose metric falls there from the
    best to the worst, beside one trial that stayed the best throughout."""
    scheduler = ASHAScheduler(
        metric=METRIC, mode="max", max_t=max_t, grace_period=grace, reduction_factor=factor
    )
    steady, falling = Trial("fake", stub=True), Trial("fake", stub=True)
    for trial in (steady, falling):
        scheduler.on_trial_add(None, trial)
    for e in range(1, max_t):
        scheduler.on_trial_result(None, steady, {"training_iteration": e, METRIC: 1.0})
    for e in range(1, epoch):
        assert scheduler.on_trial_result(None, falling, {"training_iteration": e, METRIC: 1.0}) == CONTINUE
    return scheduler.on_trial_result(None, falling, {"training_iteration": epoch, METRIC: 0.0}) == STOP


@pytest.mark.parametrize(
    ("grace", "factor", "max_t"),
    [(1, 3, 6), (1, 2, 3), (1, 3, 9), (2, 2, 16), (1, 3.0, 27), (3, 3, 3), (2, 1.5, 12), (1, 1.3, 10)],
)
def test_rung_epochs_are_where_rays_asha_stops_a_trial(grace, factor, max_t):
    """Non-integer milestones (2 * 1.5**2 = 4.5) are decided at the next epoch (5)."""
    decided = [e for e in range(1, max_t) if asha_decides_at(grace, factor, max_t, e)]
    assert rung_epochs(grace, factor, max_t) == decided
    if (grace, factor) == (2, 1.5):
        assert decided == [2, 3, 5, 7, 11]


def test_a_rung_that_orders_trials_as_the_end_does_correlates_fully():
    finished = [result(f"t{i}", [0.1 * i, 0.05, 0.1 * i + 0.3]) for i in range(6)]
    stopped = result("early", [0.9])  # stopped at the first rung: not counted
    [rung] = rung_fidelity(
        finished + [stopped], metric=METRIC, max_epochs=3, grace_period=1, reduction_factor=3
    )
    assert (rung.epoch, rung.trials, rung.spearman) == (1, 6, pytest.approx(1.0))
    lines = fidelity_lines([rung], max_epochs=3)
    assert lines == [
        "ASHA rung at epoch 1: Spearman +1.00 between the metric there and the final one, over 6 "
        "trials that ran every epoch"
    ]


def test_a_poor_rung_warns_and_suggests_the_next_rung_as_grace_period():
    # epoch 1 reverses the final order and epoch 3 keeps it; the final value is the best epoch (9)
    finished = [result(f"t{i}", [0.6 - 0.1 * i, 0.0, 0.1 * i, *[0.0] * 5, 0.7 + 0.05 * i]) for i in range(5)]
    fidelity = rung_fidelity(finished, metric=METRIC, max_epochs=9, grace_period=1, reduction_factor=3)
    assert [(r.epoch, r.spearman) for r in fidelity] == [(1, pytest.approx(-1.0)), (3, pytest.approx(1.0))]
    lines = fidelity_lines(fidelity, max_epochs=9)
    assert lines[-1].startswith("warning: the order at epoch 1 predicts the final order poorly")
    assert lines[-1].endswith("Suggested: --grace-period 3")
    # with 3 epochs in all, the next rung is the end: no early stopping at all
    [rung] = rung_fidelity(finished, metric=METRIC, max_epochs=3, grace_period=1, reduction_factor=3)
    assert rung.spearman == pytest.approx(-1.0)
    last = fidelity_lines([rung], max_epochs=3)[-1]
    assert last.endswith("Suggested: --grace-period 3 (ASHA then stops no trial)")


def test_too_few_finished_trials_or_equal_scores_give_no_number():
    few = [result(f"t{i}", [0.1 * i, 0.2 * i]) for i in range(4)]
    [rung] = rung_fidelity(few, metric=METRIC, max_epochs=2, grace_period=1, reduction_factor=2)
    assert (rung.trials, rung.spearman) == (4, None)
    [line] = fidelity_lines([rung], max_epochs=2)
    assert "no rank correlation: 4 trials ran every epoch, and fewer than 5 say nothing" in line
    same = [result(f"t{i}", [0.0, 0.1 * i]) for i in range(6)]
    [rung] = rung_fidelity(same, metric=METRIC, max_epochs=2, grace_period=1, reduction_factor=2)
    assert (rung.trials, rung.spearman) == (6, None)
    assert "all 6 trials scored the same" in fidelity_lines([rung], max_epochs=2)[0]


def trial(
    name: str, value: float, samples: list[float], images: tuple[str, ...] = ("a", "b", "c"), **kwargs
) -> TrialInterval:
    drawn = np.array(samples)
    low, high = np.percentile(drawn, [2.5, 97.5])
    interval = Interval(value, float(low), float(high), 0.95, images, drawn)
    return TrialInterval(name, name, value, interval, **kwargs)


def test_the_table_shows_each_interval_and_how_often_a_runner_up_ties_the_best():
    best = trial("trial_a", 0.80, [0.7, 0.8, 0.9, 0.85])
    close = trial("trial_b", 0.78, [0.75, 0.81, 0.8, 0.8])  # >= trial_a in 2 of 4 resamples
    far = trial("trial_c", 0.30, [0.2, 0.3, 0.4, 0.3])
    other_split = trial("trial_d", 0.20, [0.1, 0.2, 0.3, 0.2], images=("d", "e", "f"))
    lines = interval_lines([best, close, far, other_split], METRIC)
    assert lines[0] == (
        "top 4 by segm_AP50, 95% interval of segm_AP50 from 4 bootstrap resamples of the 3 "
        "validation images (seed 0):"
    )
    interval = f"[{best.interval.low:.4f}, {best.interval.high:.4f}]"
    assert lines[1].endswith("95% interval        as good as #1")
    assert lines[2] == f"  1  {'trial_a':<24} {0.8:>10.4f}  {interval}"
    assert lines[3].split()[-1] == "50%" and lines[4].split()[-1] == "0%"
    assert lines[5].endswith("]")  # validated on other images: no paired share
    assert lines[6].startswith("note: trial_b scores at least as high as trial_a in 50% of the resamples")
    assert close.metrics(best) == {
        "segm_AP50_ci95_low": close.interval.low,
        "segm_AP50_ci95_high": close.interval.high,
        "segm_AP50_share_at_least_best": 0.5,
    }
    assert not any(line.startswith("note") for line in interval_lines([best, far], METRIC))
    lines = interval_lines([best], METRIC, {"trial_x": "gone", "trial_y": "lost", "trial_z": "gone"})
    assert lines[-2:] == ["no interval for trial_x, trial_z: gone", "no interval for trial_y: lost"]


def test_the_table_takes_the_runs_keep_top_kept_in_export_best_order(mlflow_uri: str) -> None:
    """--reseed-top 2 --reseeds 2, --keep-top 5 and --ci-top 5: b has the best mean over seeds
    and a the best single trial. The intervals go to the five runs --keep-top kept, in
    export --best's order (b's seeds first, then a's), not to the five best single trials; a
    run beyond them is named with the reason its checkpoint is gone."""
    tracker = Tracker(mlflow_uri)
    parent = tracker.start_run("cellseg", "s", tags={SOURCE_TAG: "search-parent"})
    ids: dict[str, str] = {}
    for name, value, repeats in (
        *((n, v, None) for n, v in (("a0", 0.90), ("b0", 0.85), ("c0", 0.80), ("d0", 0.70), ("e0", 0.60))),
        *(("a1", 0.70, "a0"), ("a2", 0.72, "a0"), ("b1", 0.84, "b0"), ("b2", 0.83, "b0")),
    ):
        tags = {SOURCE_TAG: "search", **({REPEAT_TAG: ids[repeats]} if repeats else {})}
        ids[name] = tracker.start_run(
            "cellseg", name, params={"train.metric": METRIC}, tags=tags, parent_run_id=parent
        )
        tracker.log_metrics(ids[name], {f"best_{METRIC}": value}, step=0)
        tracker.end_run(ids[name])

    def children() -> list:
        return tracker.records("cellseg", f"tags.`{PARENT_TAG}` = '{parent}'")

    drop_beyond_top(tracker, ranked_candidates(children()), 5)  # as the driver does after re-seeding
    kept, missing = interval_runs(children(), 5)
    assert [c.record.name for c in kept] == ["b0", "b1", "b2", "a0", "a2"] and missing == {}
    kept, missing = interval_runs(children(), 7)
    assert [c.record.name for c in kept] == ["b0", "b1", "b2", "a0", "a2"]
    assert list(missing) == ["a1", "c0"]
    samples = [0.5, 0.6, 0.7]
    lines = interval_lines(
        [trial(c.record.name, c.value, samples, reseeded=True) for c in kept], METRIC, missing
    )
    assert lines[0].startswith(
        "top 5 in export --best's order (re-seeded configurations first, by mean segm_AP50 over seeds)"
    )
    assert [line.split()[1] for line in lines[2:7]] == ["b0", "b1", "b2", "a0", "a2"]
    assert lines[-1].startswith(
        "no interval for a1, c0: its checkpoint was dropped by --keep-top (not among the 5 best "
        "trials in export --best's order"
    )


def test_two_splits_of_one_size_are_not_paired(easy_root: Path, tmp_path: Path) -> None:
    """COCO's image ids are positions in the split, (0, 1, 2, 3) for any 4 validation images: the
    share compares the validation items' ids, so a searched split seed gives no share."""
    cfg = load_config(
        TRIALS / "demo.yaml", {"data.root": str(easy_root), "model.min_size": 64, "model.max_size": 128}
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    intervals = []
    for seed in (0, 1):
        path = tmp_path / f"split{seed}.pt"
        save_checkpoint(
            path, make_state(apply_overrides(cfg, {"data.split_seed": seed}), model, epoch=1, metrics={})
        )
        intervals.append(TrialInterval(f"split{seed}", "", 0.0, checkpoint_interval(path, device="cpu")))
    first, second = intervals
    assert first.interval.images == second.interval.images == 4
    assert first.interval.image_names != second.interval.image_names
    assert second.share_at_least(first) is None and "segm_AP50_share_at_least_best" not in second.metrics(
        first
    )
    assert first.share_at_least(first) == 1.0  # the same items: paired
