"""cellseg.commands' own logic, fast: what a failing or resumed ``cellseg train`` leaves in MLflow.

(The successful paths, which train models, are in test_cli.py; export --best's choice is in
test_best_run.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.commands import train_and_track
from cellseg.config import Config, DataConfig, TrainConfig
from cellseg.data import DataError, dataset_fingerprint
from cellseg.tracking import Tracker


def test_a_failing_run_is_failed_and_resuming_it_reuses_the_run(tmp_path: Path, mlflow_uri: str) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)  # no training folder: fit fails after the run starts
    cfg = Config(
        data=DataConfig(root=str(data)), train=TrainConfig(output_dir=str(tmp_path / "runs"), device="cpu")
    )
    common = {
        "experiment": "e",
        "tracking_uri": mlflow_uri,
        "config_path": tmp_path / "c.yaml",
        "progress": False,
    }
    with pytest.raises(DataError, match="empty dataset"):
        train_and_track(cfg, name="r", resume_from=None, **common)
    tracker = Tracker(mlflow_uri)
    [run] = tracker.records("e")
    assert run.status == "FAILED" and "empty dataset" in run.tags["error"]
    assert run.source == "train" and run.fingerprint == dataset_fingerprint(cfg.data).digest
    assert run.tags["cellseg.run_dir"] == str((tmp_path / "runs" / "r").resolve())

    with pytest.raises(DataError):  # --resume RUN_DIR finds the run by its directory
        train_and_track(cfg, name="ignored", resume_from=str(tmp_path / "runs" / "r"), **common)
    [again] = tracker.records("e")
    assert again.run_id == run.run_id and again.status == "FAILED"
