"""Tune's loggers in the search: result.json is written for every result, also after a restore;
with local storage in the trial's folder, none left in the driver's staging folder for Tune's
saves to copy, and kept in step with Tune's state on a restart."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback

from search.linked_storage import storage_filesystem
from search.result_file import keep_results_through, needs_default_loggers, result_logger
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
        default_loggers = needs_default_loggers(str(tmp_path / "s"), None)
        assert default_loggers
        (result,) = fit_tuner(restored, max_pending=1, strict_metrics=True, default_loggers=default_loggers)
    assert result.error is None and result.metrics["epoch"] == 4
    (results_file,) = (tmp_path / "s").glob("*/result.json")
    assert [json.loads(line)["epoch"] for line in results_file.read_text().splitlines()] == [1, 2, 3, 4]


class StagedFiles(Callback):
    """Appends to ``record`` the files in each ended trial's folder of the driver's staging area
    (what every save of Tune's state copies to the storage), but the error files Tune writes for a
    failed trial. A file, since a restored experiment runs an unpickled copy of its callbacks."""

    def __init__(self, record: Path) -> None:
        self.record = record

    def _look(self, trial: Trial) -> None:
        with self.record.open("a") as record:
            files = [p for p in Path(trial.local_path).rglob("*") if p.is_file()]
            record.writelines(f"{p}\n" for p in files if not p.name.startswith("error."))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._look(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._look(trial)


def _run_config(storage: Path, staged: StagedFiles) -> tune.RunConfig:
    return tune.RunConfig(
        name="s",
        storage_path=str(storage),
        storage_filesystem=storage_filesystem(str(storage)),
        callbacks=[staged, result_logger(local_storage=True)],
    )


def _epochs(results_file: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in results_file.read_text().splitlines()]


def test_results_are_written_in_the_trial_folder_and_a_restore_adds_no_second_logger(tmp_path: Path):
    """A trial fails at epoch 3 and is resumed from storage, with lines past its checkpoint in
    result.json as after a driver's crash: the file in its storage folder holds each epoch once,
    and the driver's staging folder never held a results file of the trial."""
    marker = tmp_path / "second-attempt"
    staged = StagedFiles(tmp_path / "staged.txt")
    staged.record.touch()
    with ray_for_test_trainables():
        (first,) = fit_tuner(
            tune.Tuner(
                _fails_once_at_epoch_3,
                param_space={"marker": str(marker)},
                run_config=_run_config(tmp_path, staged),
            ),
            max_pending=1,
            strict_metrics=True,
        )
        assert first.error is not None
        (results_file,) = (tmp_path / "s").glob("*/result.json")
        assert _epochs(results_file) == [1, 2]
        assert json.loads((results_file.parent / "params.json").read_text()) == {"marker": str(marker)}
        with results_file.open("a") as lagging:  # written after Tune's last save, then a crash
            lagging.write('{"training_iteration": 3, "epoch": 3}\n{"training_iter')
        marker.touch()
        restored = tune.Tuner.restore(
            str(tmp_path / "s"),
            _fails_once_at_epoch_3,
            resume_errored=True,
            storage_filesystem=storage_filesystem(str(tmp_path)),
        )
        assert not needs_default_loggers(str(tmp_path / "s"), storage_filesystem(str(tmp_path)))
        (result,) = fit_tuner(restored, max_pending=1, strict_metrics=True)
    assert result.error is None and result.metrics["epoch"] == 4
    assert _epochs(results_file) == [1, 2, 3, 4]
    assert list(result.metrics_dataframe["epoch"]) == [1, 2, 3, 4]
    assert staged.record.read_text() == ""  # both runs ended the trial; neither staged a results file


def test_keep_results_through_drops_what_the_restart_reports_again(tmp_path: Path):
    path = tmp_path / "result.json"
    keep_results_through(path, 3)  # no file: nothing to do
    assert not path.exists()
    lines = [json.dumps({"training_iteration": i, "epoch": i}) + "\n" for i in range(1, 6)]
    path.write_text("".join(lines))
    before = os.stat(path)
    keep_results_through(path, 5)
    assert os.stat(path).st_ino == before.st_ino  # nothing past 5: not rewritten
    keep_results_through(path, 3)
    assert path.read_text() == "".join(lines[:3])
    path.write_text("".join(lines[:3]) + '{"training_iteration": 4, "ep')  # a crash mid-line
    keep_results_through(path, 9)
    assert path.read_text() == "".join(lines[:3])


def test_an_experiment_with_no_result_file_yet_is_restored_with_tunes_loggers(tmp_path: Path):
    """Nothing tells an earlier cellseg's experiment from the search's own: Tune's default loggers,
    to which the search's logger, being a JSON logger, adds no second one."""
    (tmp_path / "s" / "trial_0").mkdir(parents=True)
    assert needs_default_loggers(str(tmp_path / "s"), None)
    assert needs_default_loggers("nosuchscheme://bucket/s", None)
    (tmp_path / "s" / "trial_0" / "result.json").touch()
    assert not needs_default_loggers(str(tmp_path / "s"), storage_filesystem(str(tmp_path)))
    assert isinstance(result_logger(local_storage=True), JsonLoggerCallback)
    assert type(result_logger(local_storage=False)) is JsonLoggerCallback  # remote: Tune's own
