"""``cellseg refit`` and ``export --refit`` on a real MLflow SQLite store: a search's trials written
as the search's MLflow callback writes them (params, dataset, per-epoch metric, best metric,
config.yaml), then a real refit trained on a tiny synthetic dataset and exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cellseg.checkpoint import checkpoint_config, file_sha256, load_checkpoint
from cellseg.cli import main
from cellseg.commands import config_on_data
from cellseg.config import Config, DataConfig, flatten, load_config
from cellseg.data import dataset_fingerprint, make_synthetic_dataset
from cellseg.errors import TrackingError
from cellseg.inference_settings import SETTINGS_FILE, InferenceSettings, write_settings
from cellseg.refit import best_epoch, plan_from_config, plan_from_run, refit_epochs, refit_of
from cellseg.tracking import PARENT_TAG, REFIT_TAG, SEARCH_TAG, SOURCE_TAG, Tracker, best_metric_key

DEMO = Path(__file__).resolve().parents[1] / "trials" / "demo.yaml"
EXPERIMENT = "refit"


def source_config(root: Path, out: Path) -> Config:
    """The demo preset at 64-128 px on ``root``: 8 images split 6 train / 2 validation."""
    return load_config(
        DEMO,
        [
            "model.min_size=64",
            "model.max_size=128",
            "data.val_fraction=0.25",
            "train.epochs=5",
            f"data.root={root}",
            f"train.output_dir={out}",
        ],
    )


def write_trial(tracker: Tracker, parent: str, name: str, cfg: Config, curve: list[float]) -> str:
    """A finished trial as search/mlflow_callback.py writes it, validated once per epoch."""
    run_id = tracker.start_run(
        EXPERIMENT,
        name,
        params=flatten(cfg),
        tags={SOURCE_TAG: "search"},
        parent_run_id=parent,
        dataset=dataset_fingerprint(cfg.data),
    )
    for epoch, value in enumerate(curve, start=1):
        tracker.log_metrics(run_id, {"epoch": epoch, cfg.train.metric: value}, step=epoch)
    tracker.log_metrics(run_id, {best_metric_key(cfg.train.metric): max(curve)}, step=0)
    tracker.log_config(run_id, cfg)
    tracker.end_run(run_id)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path) -> dict:
    """Search 's1' on 8 easy images: trial 'best' (best epoch 2 of 4) above trial 'slow' (best
    epoch 4 of 5, the first of two equal values)."""
    tmp = tmp_path_factory.mktemp("refit")
    data = make_synthetic_dataset(tmp / "data", 8, 2, seed=3, profile="easy")
    shutil.copy(_empty_mlflow_db, tmp / "mlflow.db")
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}")
    cfg = source_config(data, tmp / "runs")
    parent = tracker.start_run(EXPERIMENT, "s1", tags={SOURCE_TAG: "search-parent", SEARCH_TAG: "s1"})
    ids = {
        "parent": parent,
        "best": write_trial(tracker, parent, "best", cfg, [0.1, 0.6, 0.6, 0.2]),
        "slow": write_trial(tracker, parent, "slow", cfg, [0.1, 0.2, 0.3, 0.5, 0.5]),
    }
    return {"tmp": tmp, "data": data, "tracker": tracker, "uri": tracker.uri, "cfg": cfg, "ids": ids}


def test_the_epoch_rule() -> None:
    assert best_epoch([(1, 0.1), (2, 0.5), (3, float("nan")), (4, 0.5)]) == 2  # first of equal bests
    assert best_epoch([(1, float("nan"))]) is None and best_epoch([]) is None
    assert refit_epochs(10, 178, 209) == 9  # the real data: 8.5 epochs of 209 images
    assert refit_epochs(4, 6, 8) == 3 and refit_epochs(1, 1, 100) == 1
    assert refit_epochs(4, 6, 6) == 4  # the same images: the same epochs


def test_the_plan_takes_the_source_config_and_its_best_epoch(store: dict, tmp_path: Path) -> None:
    tracker, data, slow = store["tracker"], store["data"], store["ids"]["slow"]
    plan = plan_from_run(
        tracker, tracker.record(slow), "s1", data_root=None, overrides=[], epochs=None, scratch=tmp_path
    )
    assert plan.rule == "ceil(4 x 6 / 8) = 3"  # best epoch 4 on 6 of the 8 images
    cfg = store["cfg"]
    assert plan.config.train.epochs == 3 and plan.config.data.val_fraction == 0.0
    assert plan.config.data.root == str(data)
    assert plan.config.model == cfg.model and plan.config.optim == cfg.optim  # the source's configuration
    assert plan.tags() == {
        "cellseg.refit_epochs": plan.rule,
        "cellseg.refit": slow,
        "cellseg.refit_search": "s1",
    }

    grown = tmp_path / "grown"  # 4 more images since the search: the source trained on 6 of 8
    shutil.copytree(data, grown)
    for folder in sorted((grown / "train").iterdir())[:4]:
        shutil.copytree(folder, folder.with_name(folder.name + "-new"))
    plan = plan_from_run(
        tracker,
        tracker.record(slow),
        "s1",
        data_root=str(grown),
        overrides=["train.device=cpu"],
        epochs=None,
        scratch=tmp_path / "2",
    )
    assert plan.rule == "ceil(4 x 6 / 12) = 2" and plan.config.data.root == str(grown)
    forced = plan_from_run(
        tracker, tracker.record(slow), None, data_root=None, overrides=[], epochs=7, scratch=tmp_path / "3"
    )
    assert forced.config.train.epochs == 7 and forced.rule == "--epochs 7"
    assert "cellseg.refit_search" not in forced.tags()

    from_file = plan_from_config(DEMO, str(data), ["train.epochs=2"], None)
    assert from_file.source is None and from_file.config.train.epochs == 2
    assert from_file.config.data.val_fraction == 0.0 and "cellseg.refit" not in from_file.tags()


@pytest.mark.slow
def test_refit_then_export_best_refit(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """refit --best trains the best trial's configuration on all 8 images for ceil(2 x 6 / 8) = 2
    epochs, as a child of the search's parent; export --best --refit exports that refit."""
    data, uri, ids = str(store["data"]), store["uri"], store["ids"]
    mlflow = ["--experiment", EXPERIMENT, "--tracking-uri", uri]
    output = tmp_path / "test-results.json"
    export = [
        "export",
        "--best",
        "--refit",
        "--data",
        data,
        *mlflow,
        "--output",
        str(output),
        "--no-progress",
    ]

    assert main(export) == 2  # no refit yet: the error names the command that makes one
    err = capsys.readouterr().err
    assert f"run {ids['best']} (best) has no finished refit on {data} in experiment '{EXPERIMENT}'" in err
    assert f"cellseg refit --run-id {ids['best']} --data {data} --tracking-uri {uri}" in err
    assert not output.exists()

    runs = tmp_path / "runs"
    code = main(
        ["refit", "--best", "--data", data, *mlflow, "--set", f"train.output_dir={runs}", "--no-progress"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"refit of run {ids['best']} (best) of search 's1': 2 epochs (ceil(2 x 6 / 8) = 2)" in out
    assert "no validation (data.val_fraction 0): the final epoch 2 is saved" in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (refit,) = client.search_runs([experiment], f"tags.`cellseg.refit` = '{ids['best']}'")
    tags, params = refit.data.tags, refit.data.params
    assert refit.info.status == "FINISHED"
    assert tags[PARENT_TAG] == ids["parent"] and tags[SOURCE_TAG] == "refit"
    assert tags["cellseg.refit_search"] == "s1" and tags["cellseg.refit_epochs"] == "ceil(2 x 6 / 8) = 2"
    assert params["train.epochs"] == "2" and params["data.val_fraction"] == "0.0"
    all_images = dataset_fingerprint(DataConfig(root=data, val_fraction=0.0))
    assert tags["cellseg.data_fingerprint"] == all_images.digest
    assert [d.dataset.digest for d in refit.inputs.dataset_inputs] == [all_images.digest]
    assert "best_segm_AP50" not in refit.data.metrics and refit.data.metrics["epoch"] == 2
    assert {a.path for a in client.list_artifacts(refit.info.run_id, "checkpoint")} == {"checkpoint/best.pt"}
    run_dir = Path(tags["cellseg.run_dir"])
    assert main(["evaluate", "--checkpoint", str(run_dir), "--no-progress"]) == 2  # nothing to validate on
    assert "data.val_fraction 0" in capsys.readouterr().err

    assert main(export) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"run_id: {refit.info.run_id}" in out and f"refit_of: {ids['best']}" in out
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    assert provenance["run_id"] == refit.info.run_id and provenance["search"] == "s1"
    assert provenance["metric_value"] is None  # a refit is not validated
    assert provenance["fingerprint"] == all_images.digest
    assert provenance["refit_of"]["run_id"] == ids["best"] and provenance["refit_of"]["metric_value"] == 0.6
    assert json.loads(output.read_text()) is not None
    assert {a.path for a in client.list_artifacts(refit.info.run_id, "export")} >= {
        "export/test-results.json",
        "export/test-results.provenance.json",
    }
    assert main([*export, "--ensemble", "2"]) == 2  # the second best has no refit
    assert f"run {ids['slow']} (slow) has no finished refit" in capsys.readouterr().err
    # refit --run-id logs beside its source without --experiment (the default would be "cellseg")
    code = main(
        ["refit", "--run-id", ids["slow"], "--epochs", "1", "--tracking-uri", uri]
        + ["--set", f"train.output_dir={runs}", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    (slow_refit,) = client.search_runs([experiment], f"tags.`cellseg.refit` = '{ids['slow']}'")
    assert slow_refit.data.tags[PARENT_TAG] == ids["parent"]
    assert client.get_experiment_by_name("cellseg") is None
    assert main([*export, "--ensemble", "2"]) == 0, capsys.readouterr().err
    by_id = ["export", "--run-id", ids["best"], "--refit", *export[3:]]
    assert main(by_id) == 0, capsys.readouterr().err
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    assert provenance["run_id"] == refit.info.run_id and provenance["search"] == "s1"
    assert provenance["refit_of"]["run_id"] == ids["best"]
    assert provenance["inference_settings"] is None  # none tuned for the source yet
    assert any(r["score"] <= 0.25 for r in json.loads(output.read_text()))

    # settings tuned on the source's validation predictions (the refit has none) apply to its refit
    stale = write_settings(tmp_path / SETTINGS_FILE, InferenceSettings(score_threshold=0.25), {})
    client.log_artifact(ids["best"], str(stale), "checkpoint")
    assert main(export) == 2  # the source (made by hand here) has no best.pt to check them against
    assert "--no-tuned-settings" in capsys.readouterr().err
    source = Tracker(uri).download_checkpoint(refit.info.run_id, tmp_path / "source")
    client.log_artifact(ids["best"], str(source), "checkpoint")  # the source's best.pt, for the test
    assert main(export) == 2  # not tied to the source's checkpoint and data
    assert "--no-tuned-settings" in capsys.readouterr().err
    source_data = config_on_data(checkpoint_config(load_checkpoint(source)), data).data
    tied = {
        "checkpoint_sha256": [file_sha256(source)],
        "data_fingerprint": dataset_fingerprint(source_data).digest,
    }
    tuned = write_settings(tmp_path / SETTINGS_FILE, InferenceSettings(score_threshold=0.25), tied)
    client.log_artifact(ids["best"], str(tuned), "checkpoint")
    assert main(export) == 0, capsys.readouterr().err
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    assert provenance["run_id"] == refit.info.run_id
    assert provenance["inference_settings"]["score_threshold"] == 0.25
    assert all(r["score"] > 0.25 for r in json.loads(output.read_text()))


def test_refit_errors(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, uri, ids = str(store["data"]), store["uri"], store["ids"]
    mlflow = ["--experiment", EXPERIMENT, "--tracking-uri", uri]
    assert main(["refit", "--best", *mlflow]) == 2
    assert "refit --best needs --data" in capsys.readouterr().err
    assert main(["refit", "--run-id", ids["parent"], *mlflow]) == 2
    assert f"run {ids['parent']} (s1) is not a training run or a search's trial" in capsys.readouterr().err
    assert main(["refit", "--run-id", ids["best"], "--search", "s1", *mlflow]) == 2
    assert "add --best" in capsys.readouterr().err
    assert main(["refit", "--run-id", ids["best"], "--experiment", "cellseg", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"--experiment cellseg: run {ids['best']} (best) is in experiment '{EXPERIMENT}'" in err
    assert f"pass --experiment {EXPERIMENT}" in err
    assert main(["refit", "--config", str(DEMO), *mlflow]) == 2
    assert "refit --config needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["refit", "--best", "--data", data, "--epochs", "0", *mlflow])
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err

    tracker: Tracker = store["tracker"]
    silent = tracker.start_run(EXPERIMENT, "silent", tags={SOURCE_TAG: "train"})
    tracker.log_config(silent, store["cfg"])
    tracker.end_run(silent)
    assert main(["refit", "--run-id", silent, "--data", data, *mlflow]) == 2
    assert f"run {silent} (silent) logged no segm_AP50 per epoch" in capsys.readouterr().err
    bare = tracker.start_run(EXPERIMENT, "bare", tags={SOURCE_TAG: "train"})
    assert main(["refit", "--run-id", bare, *mlflow]) == 2
    err = capsys.readouterr().err
    assert "has no config.yaml artifact" in err and "--config FILE --data DIR" in err

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"")
    assert main(["export", "--checkpoint", str(checkpoint), "--refit", "--data", data]) == 2
    assert "drop it with --checkpoint" in capsys.readouterr().err


def write_refit(tracker: Tracker, source: str, name: str, data: Path, status: str = "FINISHED") -> str:
    """A refit of run ``source`` on ``data`` as ``cellseg refit`` logs it, without the training."""
    data_cfg = DataConfig(root=str(data), val_fraction=0.0)
    run_id = tracker.start_run(
        "refit-choice",
        name,
        params={"data.root": data, "data.val_fraction": 0.0, "data.split_seed": data_cfg.split_seed},
        tags={SOURCE_TAG: "refit", REFIT_TAG: source},
        dataset=dataset_fingerprint(data_cfg),
    )
    tracker.end_run(run_id, status)
    return run_id


def test_the_refit_exported_is_the_newest_on_the_data_asked(
    store: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker, data = store["tracker"], store["data"]
    other = tmp_path / "other"  # the same images and one more
    shutil.copytree(data, other)
    first = sorted((other / "train").iterdir())[0]
    shutil.copytree(first, first.with_name(first.name + "-new"))
    source_id = tracker.start_run(
        "refit-choice", "source", params={"data.root": data}, tags={SOURCE_TAG: "train"}
    )
    source = tracker.record(source_id)
    with pytest.raises(TrackingError, match=f"run {source_id} \\(source\\) has no finished refit on"):
        refit_of(tracker, source, None)
    older = write_refit(tracker, source_id, "older", data)
    newer = write_refit(tracker, source_id, "newer", data)
    elsewhere = write_refit(tracker, source_id, "elsewhere", other)
    write_refit(tracker, source_id, "failed", data, "FAILED")

    with caplog.at_level("WARNING", logger="cellseg.refit"):
        assert refit_of(tracker, source, str(data)).run_id == newer
    (warning,) = caplog.messages
    assert f"has 2 finished refits on {data}; taking the newest, {newer} (newer:" in warning
    assert f"over {older} (older:" in warning and elsewhere not in warning
    assert refit_of(tracker, source, None).run_id == newer  # the source's data by default
    caplog.clear()
    with caplog.at_level("WARNING", logger="cellseg.refit"):
        assert refit_of(tracker, source, str(other)).run_id == elsewhere  # newest overall, but asked for
    assert caplog.messages == []

    third = tmp_path / "third"
    shutil.copytree(other, third)
    shutil.copytree(first, third / "train" / "another")
    with pytest.raises(TrackingError) as error:
        refit_of(tracker, source, str(third))
    message = str(error.value)
    assert f"no finished refit on {third} in experiment 'refit-choice'" in message
    assert f"its refits on other data: {older} (older:" in message and f"{elsewhere} (elsewhere:" in message
    assert f"cellseg refit --run-id {source_id} --data {third} --tracking-uri {tracker.uri}" in message
