"""What a trial reports to Tune: only what Tune and the search's readers use stays a number;
the MLflow callback gets every number back."""

from __future__ import annotations

import json
import math

from ray.tune.experiment import Trial

from cellseg.training import TRAIN_SECONDS, VAL_SECONDS
from search.tune_report import METRICS_KEY, NODE_KEY, reported_metrics, tune_result

EPOCH = {
    "epoch": 3.0,
    "lr": 0.01,
    "train_loss": 0.5,
    "train_loss_mask": 0.2,
    "segm_AP50": 0.4,
    "bbox_AP50": 0.45,
    "segm_AP": float("nan"),
    TRAIN_SECONDS: 10.0,
    VAL_SECONDS: 2.0,
}


def test_tune_gets_the_metric_epoch_seconds_and_node_as_values_the_rest_as_one_text():
    result = tune_result(EPOCH, metric="segm_AP50", node_id="n1")
    numbers = {k for k, v in result.items() if isinstance(v, (int, float))}
    assert numbers == {"epoch", "segm_AP50", TRAIN_SECONDS, VAL_SECONDS}
    assert result[NODE_KEY] == "n1" and isinstance(result[METRICS_KEY], str)
    assert set(json.loads(result[METRICS_KEY])) == {
        "lr",
        "train_loss",
        "train_loss_mask",
        "bbox_AP50",
        "segm_AP",
    }


def test_an_epoch_without_validation_reports_no_metric():
    unvalidated = {k: v for k, v in EPOCH.items() if "AP" not in k}
    assert "segm_AP50" not in tune_result(unvalidated, metric="segm_AP50", node_id="n1")


def test_the_callback_gets_every_number_back_and_tunes_own_keys_left_out():
    result = {**tune_result(EPOCH, metric="segm_AP50", node_id="n1"), "training_iteration": 3, "done": False}
    back = reported_metrics(result, skip={"training_iteration", "done"})
    assert back.keys() == EPOCH.keys()
    assert all(back[k] == v or (math.isnan(back[k]) and math.isnan(v)) for k, v in EPOCH.items())


def test_tunes_saved_state_of_a_trial_holds_statistics_of_the_kept_numbers_only():
    trial = Trial("train_trial", config={}, trial_id="t_00001", stub=True)
    for epoch in range(1, 4):
        trial.update_last_result(
            {
                **tune_result({**EPOCH, "epoch": float(epoch)}, metric="segm_AP50", node_id="n"),
                "training_iteration": epoch,
            }
        )
    analysed = json.loads(trial.get_json_state()[1])["metric_analysis"]
    assert {"segm_AP50", "epoch"} <= set(analysed) and not {"lr", "train_loss", "bbox_AP50"} & set(analysed)
