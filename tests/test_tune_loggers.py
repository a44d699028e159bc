"""Tune's loggers in the search: result.json is written for every result, also after a restore."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ray import tune

from search.result_file import ran_with_default_loggers
from search.run import fit_tuner
from searchutil import ray_for_test_trainables


def _fails_once_at_epoch_3(config: dict) -> None:
    start = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = int(Path(folder, "epoch").read_text()) + 1
    for epoch in range(start, 5):
        if epoch == 3 and not Path(config["marker"]).exists():
            raise RuntimeError("the first attempt fails at epoch 3")
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "epoch").write_text(str(epoch))
            tune.report({"epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(folder))


def test_a_restored_experiment_saved_without_the_json_logger_still_writes_result_json(tmp_path: Path):
    """An experiment saved by an earlier cellseg (no JSON logger among its callbacks; Tune added
    its default loggers then) and resumed now keeps getting result.json, which the summary, the
    ranking and the efficiency figure read."""
    marker = tmp_path / "second-attempt"
    with ray_for_test_trainables():  # the workers import the trainable from here
        (first,) = tune.Tuner(
            _fails_once_at_epoch_3,
            param_space={"marker": str(marker)},
            run_config=tune.RunConfig(name="s", storage_path=str(tmp_path)),
        ).fit()
        assert first.error is not None
        marker.touch()
        restored = tune.Tuner.restore(str(tmp_path / "s"), _fails_once_at_epoch_3, resume_errored=True)
        default_loggers = ran_with_default_loggers(str(tmp_path / "s"), None)
        assert default_loggers
        (result,) = fit_tuner(restored, max_pending=1, strict_metrics=True, default_loggers=default_loggers)
    assert result.error is None and result.metrics["epoch"] == 4
    (results_file,) = (tmp_path / "s").glob("*/result.json")
    assert [json.loads(line)["epoch"] for line in results_file.read_text().splitlines()] == [1, 2, 3, 4]
