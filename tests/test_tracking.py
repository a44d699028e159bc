"""cellseg.tracking.Tracker on a real MLflow SQLite store: what each method writes and reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cellseg.checkpoint import BEST, PICTURES
from cellseg.config import Config, DataConfig, TrainConfig
from cellseg.data import dataset_fingerprint
from cellseg.tracking import MODEL_TRAINING, Tracker, TrackingError, best_metric_key


@pytest.fixture
def tracker(mlflow_uri: str) -> Tracker:
    return Tracker(mlflow_uri)


def test_experiments_are_tagged_as_model_training(tracker: Tracker) -> None:
    client = MlflowClient(tracker.uri)
    created = tracker.experiment_id("new")
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == MODEL_TRAINING
    assert tracker.experiment_id("new") == created
    untagged = client.create_experiment("old")  # made before cellseg set a kind
    assert tracker.experiment_id("old") == untagged
    assert client.get_experiment(untagged).tags["mlflow.experimentKind"] == MODEL_TRAINING
    chosen = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    tracker.experiment_id("genai")  # a kind someone chose is kept
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_records_its_dataset_as_input_and_tag(tracker: Tracker, tmp_path: Path) -> None:
    (tmp_path / "cells" / "train" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "train" / "a" / "image.tif").write_bytes(b"x" * 7)
    data = dataset_fingerprint(DataConfig(root=str(tmp_path / "cells")))
    parent = tracker.start_run("e", "parent")
    run_id = tracker.start_run(
        "e", "child", params={"optim.lr": 0.1}, tags={"k": "v"}, parent_run_id=parent, dataset=data
    )
    run = MlflowClient(tracker.uri).get_run(run_id)
    assert run.data.params == {"optim.lr": "0.1"}
    assert run.data.tags["k"] == "v" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["cellseg.data_fingerprint"] == data.digest
    [used] = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("cells", data.digest)
    assert str(tmp_path / "cells") in used.dataset.source
    assert '"train_images": 1' in used.dataset.profile
    assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "training")]
    record = tracker.record(run_id)
    assert (record.name, record.status, record.source, record.parent_id, record.fingerprint) == (
        "child",
        "RUNNING",
        "",
        parent,
        data.digest,
    )


def test_finish_run_names_the_best_after_the_metric(tracker: Tracker, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / PICTURES).mkdir(parents=True)
    torch.save({"w": 1}, run_dir / BEST)
    (run_dir / PICTURES / "history.png").write_bytes(b"png")
    cfg = Config(train=TrainConfig(metric="bbox_AP50"))
    run_id = tracker.start_run("e", "r")
    tracker.finish_run(run_id, run_dir, cfg, 0.25)
    record = tracker.record(run_id)
    assert best_metric_key("bbox_AP50") == "best_bbox_AP50"
    assert record.metrics == {"best_bbox_AP50": 0.25} and record.status == "FINISHED"
    path = tracker.download_checkpoint(run_id, tmp_path / "dl")
    assert path.name == BEST and torch.load(path) == {"w": 1}
    client = MlflowClient(tracker.uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {"checkpoint", "config.yaml", "pictures"}

    no_metric = tracker.start_run("e", "diverged")
    tracker.finish_run(no_metric, tmp_path / "empty", cfg, float("nan"), status="KILLED")
    assert tracker.record(no_metric).metrics == {} and tracker.record(no_metric).status == "KILLED"
    with pytest.raises(TrackingError, match=f"run {no_metric} has no checkpoint/best.pt"):
        tracker.download_checkpoint(no_metric, tmp_path / "dl2")


def test_drop_checkpoint_deletes_only_the_checkpoint_files(tracker: Tracker, tmp_path: Path) -> None:
    """Tracker.drop_checkpoint reaches past MlflowClient to the artifact repository's
    delete_artifacts (docs/design.md, "what stays, and why"): this fails if an MLflow upgrade
    moves, renames or empties it. Pictures and config stay; dropping again only tags."""
    run_dir = tmp_path / "run"
    (run_dir / PICTURES).mkdir(parents=True)
    torch.save({"w": 1}, run_dir / BEST)
    (run_dir / PICTURES / "history.png").write_bytes(b"png")
    run_id = tracker.start_run("e", "r")
    tracker.finish_run(run_id, run_dir, Config(), 0.5)
    [stored] = (tmp_path / "mlartifacts").rglob(f"{run_id}/artifacts/checkpoint/{BEST}")
    tracker.drop_checkpoint(run_id, "not among the 1 best trials by segm_AP50")
    client = MlflowClient(tracker.uri)
    assert client.list_artifacts(run_id, "checkpoint") == [] and not stored.parent.exists()
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "pictures"}
    assert (
        tracker.record(run_id).tags["cellseg.checkpoint_dropped"]
        == "not among the 1 best trials by segm_AP50"
    )
    with pytest.raises(TrackingError, match="has no checkpoint/best.pt"):
        tracker.download_checkpoint(run_id, tmp_path / "dl")
    tracker.drop_checkpoint(run_id, "again")
    assert tracker.record(run_id).tags["cellseg.checkpoint_dropped"] == "again"


def test_fail_reopen_and_unknown_runs(tracker: Tracker) -> None:
    failed, killed = tracker.start_run("e", "failed"), tracker.start_run("e", "killed")
    tracker.fail_run(failed, ValueError("x" * 5000))
    tracker.fail_run(killed, KeyboardInterrupt())
    assert tracker.record(failed).status == "FAILED"
    assert tracker.record(failed).tags["error"] == "x" * 4000
    assert tracker.record(killed).status == "KILLED"
    assert tracker.record(killed).tags["error"] == "KeyboardInterrupt"
    tracker.reopen_run(killed)
    assert tracker.record(killed).status == "RUNNING"
    with pytest.raises(TrackingError, match="reading run 0123abcd: MLflow at .* has no such run"):
        tracker.record("0123abcd")


def test_records_filter_and_order(tracker: Tracker) -> None:
    assert tracker.records("absent") == []
    ids = [
        tracker.start_run("e", f"r{i}", tags={"cellseg.source": "train" if i else "search"}) for i in range(3)
    ]
    assert [r.run_id for r in tracker.records("e")] == ids  # oldest first
    assert [r.name for r in tracker.records("e", "tags.`cellseg.source` = 'train'")] == ["r1", "r2"]
    assert [r.name for r in tracker.tagged("e", "cellseg.source", "train")] == ["r1", "r2"]
    assert tracker.tagged("absent", "cellseg.source", "train") == []
    tracker.start_run("other", "r3")
    assert tracker.experiment_name(ids[0]) == "e"
    assert tracker.experiment_name(tracker.records("other")[0].run_id) == "other"
