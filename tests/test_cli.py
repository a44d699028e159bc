"""``cellseg`` command line end to end: synth, inspect, train (MLflow), evaluate, export, score.

One tiny dataset and two tiny MLflow-tracked training runs are shared by the module.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellseg.checkpoint import checkpoint_config, file_sha256, load_checkpoint, save_checkpoint
from cellseg.cli import main
from cellseg.commands import chosen_run
from cellseg.config import DataConfig, flatten
from cellseg.data import (
    dataset_fingerprint,
    dataset_stats,
    ground_truth_maps,
    load_test_images,
    read_image,
    read_mask,
    scan_train,
    targets_from_label_maps,
)
from cellseg.errors import ConfigError
from cellseg.inference_settings import CacheSettings, InferenceSettings, write_settings
from cellseg.tracking import RUN_DIR_TAG, SEARCH_TAG, SOURCE_TAG, Tracker
from search.tune_inference import tune_inference
from tiffutil import HUGE, write_zeros_lzw

TRIALS = Path(__file__).resolve().parents[1] / "trials"
EXPERIMENT = "cli"
TINY = ["--set", "model.min_size=64", "--set", "model.max_size=128"]
R1_EPOCHS = 4


def run_cli(*argv: str) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured (for module-scoped fixtures without capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def printed_metric(text: str, key: str) -> float:
    match = re.search(rf"^{key}:?\s+(-?[0-9.]+)\s*$", text, flags=re.MULTILINE)
    assert match, f"{key} not printed in:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic dataset written by ``cellseg synth`` and two runs trained by ``cellseg train``."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    code, out, err = run_cli("synth", data, "--train", 8, "--test", 3, "--seed", 5, "--profile", "easy")
    assert code == 0, err
    assert out.strip() == str(data)
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = {}
    # r1's 4 epochs: after 2 its best.pt was epoch 1's, which detected nothing or a few boxes by the
    # luck of its batches; after 4 it detects in every batching tried
    for name, epochs in (("r1", R1_EPOCHS), ("r2", 1)):
        code, out, err = run_cli(
            "train",
            "--config",
            TRIALS / "demo.yaml",
            "--data",
            data,
            *TINY,
            "--set",
            f"train.epochs={epochs}",
            "--set",
            f"train.output_dir={tmp / 'runs'}",
            "--tracking-uri",
            uri,
            "--experiment",
            EXPERIMENT,
            "--name",
            name,
            "--no-progress",
        )
        assert code == 0, err
        runs[name] = out
    return {"tmp": tmp, "data": data, "uri": uri, "runs": runs, "client": MlflowClient(tracking_uri=uri)}


def run_of(workspace: dict, name: str):
    client = workspace["client"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


def checkpoint_of(workspace: dict, name: str) -> Path:
    match = re.search(r"^checkpoint: (.+)$", workspace["runs"][name], flags=re.MULTILINE)
    assert match, workspace["runs"][name]
    return Path(match.group(1))


# ----------------------------------------------------------------------------- synth, inspect


def test_synth_then_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d"
    assert main(["synth", str(data), "--train", "5", "--test", "3", "--seed", "4", "--profile", "easy"]) == 0
    assert capsys.readouterr().out.strip() == str(data)

    assert main(["inspect", str(data), "--json"]) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)  # exactly one JSON object, nothing else on stdout
    assert isinstance(stats, dict)
    assert {
        "num_train_images",
        "num_test_images",
        "max_instances_per_image",
        "instances_per_class",
    } <= stats.keys()
    assert stats["num_train_images"] == 5 and stats["num_test_images"] == 3
    assert set(stats["instances_per_class"]) == {"class1", "class2", "class3", "class4"}
    assert stats == json.loads(json.dumps(dataset_stats(data, detections_per_img=500, progress=False)))
    # counted independently from the class files: distinct non-zero ids per file
    per_image, per_class = [], dict.fromkeys(range(1, 5), 0)
    for item in scan_train(data):
        count, shape = 0, read_image(item.image_path).shape[:2]
        for c, path in item.class_paths.items():
            n = int(np.count_nonzero(np.unique(read_mask(path, shape))))
            per_class[c] += n
            count += n
        per_image.append(count)
    assert stats["max_instances_per_image"] == max(per_image)
    for c in range(1, 5):
        assert stats["instances_per_class"][f"class{c}"]["instances"] == per_class[c]


def test_inspect_text_report(synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "train images: 8" in out and "test images: 4" in out


def test_inspect_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    assert main(["inspect", str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert str(missing) in lines[0] and lines[0].startswith("cellseg inspect: error:")


def test_synth_refuses_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x").write_text("keep me")
    assert main(["synth", str(tmp_path), "--train", "1", "--test", "0"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    assert (tmp_path / "x").read_text() == "keep me"


def test_an_internal_error_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the user-fixable error types become one line; a bug (here a ValueError from
    inside a command) propagates, so Python prints its traceback."""
    import cellseg.data

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cellseg.data, "make_synthetic_dataset", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["synth", str(tmp_path / "out"), "--train", "1", "--test", "0"])


def test_synth_refuses_a_negative_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["synth", str(tmp_path / "out"), "--train", "-1"])
    assert info.value.code == 2 and "whole number" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train


def test_train_prints_checkpoint_and_logs_mlflow_run(workspace: dict) -> None:
    out = workspace["runs"]["r1"]
    checkpoint = checkpoint_of(workspace, "r1")
    assert checkpoint == (workspace["tmp"] / "runs" / "r1" / "best.pt").resolve()
    assert checkpoint.is_file()
    assert re.search(r"^best segm_AP50 [0-9.]+ at epoch [1-4]$", out, flags=re.MULTILINE), out

    client: MlflowClient = workspace["client"]
    run = run_of(workspace, "r1")
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out  # "MLflow run <id> in <uri>"
    params = run.data.params
    assert params["optim.lr"] == "0.001"
    assert params["train.epochs"] == str(R1_EPOCHS)
    assert params["model.min_size"] == "64" and params["model.backbone"] == "resnet18"
    assert params["data.root"] == str(workspace["data"].resolve())
    assert run.data.tags["cellseg.run_dir"] == str(checkpoint.parent)
    fingerprint = dataset_fingerprint(DataConfig(root=str(workspace["data"])))
    assert run.data.tags["cellseg.data_fingerprint"] == fingerprint.digest
    [dataset_input] = run.inputs.dataset_inputs  # MLflow's Dataset column
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("data", fingerprint.digest)

    for key in ("segm_AP50", "train_loss", "bbox_AP50", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, R1_EPOCHS + 1)), key
    assert not client.get_metric_history(run.info.run_id, "val_loss")  # train.val_loss is off
    history = sorted(client.get_metric_history(run.info.run_id, "segm_AP50"), key=lambda m: m.step)
    best = load_checkpoint(checkpoint)
    # step 0 is what train logged (the --best export test may log a fake value at step 1)
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "best_segm_AP50") if m.step == 0]
    assert logged == [pytest.approx(max(m.value for m in history))]
    assert logged == [pytest.approx(best["metrics"]["segm_AP50"])]

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "pictures"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {"checkpoint/best.pt"}
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert "pictures/history.png" in pictures
    config_file = client.download_artifacts(run.info.run_id, "config.yaml", str(workspace["tmp"] / "dl"))
    assert "lr: 0.001" in Path(config_file).read_text()


def test_train_unknown_key_exits_2_without_a_run(
    tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(
        [
            "train",
            "--config",
            str(TRIALS / "demo.yaml"),
            "--data",
            str(synth_root),
            "--set",
            "optim.nope=1",
            "--tracking-uri",
            uri,
            "--name",
            "bad",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()  # the config fails before MLflow is touched


def test_train_bad_config_file_names_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: fast\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--no-progress",
                "--tracking-uri",
                f"sqlite:///{tmp_path}/mlflow.db",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(config) in err and "optim.lr" in err


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_checkpoint_reproduces_training_metric(
    workspace: dict, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = checkpoint_of(workspace, "r1")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    out = capsys.readouterr().out
    value = printed_metric(out, "segm_AP50")
    assert value == pytest.approx(load_checkpoint(checkpoint)["metrics"]["segm_AP50"], abs=1e-4)
    printed_metric(out, "val_loss")
    # a run directory works too, and picks best.pt; --ci adds the bootstrap interval of segm_AP50
    assert main(["evaluate", "--checkpoint", str(checkpoint.parent), "--no-progress", "--ci"]) == 0
    out = capsys.readouterr().out
    assert printed_metric(out, "segm_AP50") == value
    low, high = map(float, re.search(r"95% interval: \[(\S+), (\S+)\]", out).groups())
    assert low <= value <= high and "1000 resamples, seed 0" in out


def test_evaluate_bad_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


# ----------------------------------------------------------------------------- export, score


def mapping_coco(data: Path) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": t.image_id, "file_name": t.file_name, "height": t.height, "width": t.width}
            for t in load_test_images(data)
        ],
        "annotations": [],
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 5)],
    }
    coco.createIndex()
    return coco


def test_export_checkpoint_writes_valid_json_and_zip(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = workspace["data"]
    output, archive = tmp_path / "out.json", tmp_path / "sub.zip"
    code = main(
        [
            "export",
            "--checkpoint",
            str(checkpoint_of(workspace, "r1")),
            "--data",
            str(data),
            "--output",
            str(output),
            "--zip",
            str(archive),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    results = json.loads(output.read_text())
    assert isinstance(results, list) and results, "a trained model detects something"
    assert f"detections: {len(results)}" in out and "images: 3" in out

    ids = {t.image_id for t in load_test_images(data)}
    assert {r["image_id"] for r in results} <= ids
    assert {r["category_id"] for r in results} <= {1, 2, 3, 4}
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = mapping_coco(data).loadRes(copy.deepcopy(results))  # loadRes edits its input
    assert len(loaded.getAnnIds()) == len(results)
    sizes = {t.image_id: [t.height, t.width] for t in load_test_images(data)}
    assert all(r["segmentation"]["size"] == sizes[r["image_id"]] for r in results)

    with zipfile.ZipFile(archive) as z:
        assert z.namelist() == ["test-results.json"]
        assert z.read("test-results.json") == output.read_bytes()
    assert (tmp_path / "out-classes.png").is_file()

    # score the same file against the synthetic test ground truth
    assert main(["score", "--results", str(output), "--data", str(data)]) == 0
    value = printed_metric(capsys.readouterr().out, "segm_AP50")
    assert 0.0 <= value <= 1.0


def test_export_refuses_a_test_image_above_the_pixel_limit_before_decoding(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    huge = write_zeros_lzw(load_test_images(data)[-1].path, (HUGE, HUGE, 4), np.uint8)
    code = main(
        [
            "export",
            "--checkpoint",
            str(checkpoint_of(workspace, "r1")),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out.json"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{huge}: {HUGE}x{HUGE} pixels" in err and "above the limit" in err, err
    assert not (tmp_path / "out.json").exists()


def perfect_results(data: Path) -> list[dict]:
    """Every ground-truth instance of the test set as a detection with score 1."""
    results = []
    for t in load_test_images(data):
        target = targets_from_label_maps(ground_truth_maps(data, t))
        for mask, label in zip(target["masks"], target["labels"]):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append(
                {
                    "image_id": t.image_id,
                    "category_id": int(label),
                    "score": 1.0,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "segmentation": {
                        "size": [int(s) for s in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                }
            )
    return results


def test_score_perfect_and_empty_results(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = workspace["data"]
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(perfect_results(data)))
    assert main(["score", "--results", str(perfect), "--data", str(data)]) == 0
    assert printed_metric(capsys.readouterr().out, "segm_AP50") == pytest.approx(1.0)

    wrong = tmp_path / "wrong.json"
    results = perfect_results(data)
    for r in results:
        r["category_id"] = r["category_id"] % 4 + 1  # every class wrong
    wrong.write_text(json.dumps(results))
    assert main(["score", "--results", str(wrong), "--data", str(data)]) == 0
    assert printed_metric(capsys.readouterr().out, "segm_AP50") == pytest.approx(0.0)

    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text("{}")
    assert main(["score", "--results", str(not_a_list), "--data", str(data)]) == 2
    assert str(not_a_list) in capsys.readouterr().err


def test_export_best_takes_the_latest_training_run_on_the_data(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two single training runs on one dataset: each is its own group, the latest wins by default
    whatever the other scored; --search NAME takes the other. Provenance is printed and written."""
    client: MlflowClient = workspace["client"]
    r1, r2 = run_of(workspace, "r1"), run_of(workspace, "r2")
    assert r1.data.tags["cellseg.data_fingerprint"] == r2.data.tags["cellseg.data_fingerprint"]
    client.log_metric(r1.info.run_id, "best_segm_AP50", 1.5, step=1)  # r1 outscores r2

    output = tmp_path / "test-results.json"
    code = main(
        [
            "export",
            "--best",
            "--data",
            str(workspace["data"]),
            "--experiment",
            EXPERIMENT,
            "--tracking-uri",
            workspace["uri"],
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"run_id: {r2.info.run_id}" in out and "run_name: r2" in out and "search: None" in out
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    assert provenance["run_id"] == r2.info.run_id and provenance["run_name"] == "r2"
    assert provenance["search"] is None and provenance["metric"] == "segm_AP50"
    assert provenance["metric_value"] == pytest.approx(r2.data.metrics["best_segm_AP50"])
    assert provenance["fingerprint"] == r2.data.tags["cellseg.data_fingerprint"]
    assert f"fingerprint: {provenance['fingerprint']}" in out
    assert json.loads(output.read_text()) is not None
    exported = {a.path for a in client.list_artifacts(r2.info.run_id, "export")}
    assert exported == {
        "export/test-results.json",
        "export/test-results-classes.png",
        "export/test-results.provenance.json",
    }
    assert client.list_artifacts(r1.info.run_id, "export") == []

    code = main(
        [
            "export",
            "--best",
            "--search",
            "r1",
            "--data",
            str(workspace["data"]),
            "--experiment",
            EXPERIMENT,
            "--tracking-uri",
            workspace["uri"],
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert f"run_id: {r1.info.run_id}" in capsys.readouterr().out
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    assert provenance["run_id"] == r1.info.run_id and provenance["metric_value"] == 1.5


def test_export_best_needs_data_and_a_matching_run(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "o.json"
    common = ["--experiment", EXPERIMENT, "--tracking-uri", workspace["uri"], "--output", str(output)]
    assert main(["export", "--best", *common]) == 2
    assert "--best needs --data" in capsys.readouterr().err

    other = tmp_path / "other"
    assert main(["synth", str(other), "--train", "2", "--test", "1", "--profile", "easy"]) == 0
    capsys.readouterr()
    assert main(["export", "--best", "--data", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert str(other) in err
    for name in ("r1", "r2"):  # each candidate with its data and date
        assert re.search(
            rf"train '{name}': 1 exportable run\(s\), data data@[0-9a-f]{{16}}, "
            r"started \d{4}-\d\d-\d\d \d\d:\d\d",
            err,
        ), err
    assert not output.exists()


def test_export_best_without_runs_exits_2(
    tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "export",
            "--best",
            "--data",
            str(synth_root),
            "--experiment",
            "empty",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--output",
            str(tmp_path / "o.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no exportable run at all" in err and "'empty'" in err
    assert not (tmp_path / "o.json").exists()


def test_export_run_id_without_checkpoint_exits_2(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    client: MlflowClient = workspace["client"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    empty = client.create_run(experiment.experiment_id, run_name="no-checkpoint").info.run_id
    client.set_terminated(empty)
    assert (
        main(
            [
                "export",
                "--run-id",
                empty,
                "--tracking-uri",
                workspace["uri"],
                "--data",
                str(workspace["data"]),
                "--output",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert empty in err and "checkpoint/best.pt" in err


def segmentations(path: Path) -> list[tuple]:
    return [
        (r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in json.loads(path.read_text())
    ]


def test_export_tta_and_ensembles(workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--tta writes a valid submission recording its flips; one model given twice exports what the
    model alone does; impossible requests (too few runs for --ensemble K) exit 2."""
    data, checkpoint = str(workspace["data"]), str(checkpoint_of(workspace, "r1"))
    plain, tta, twice = tmp_path / "plain.json", tmp_path / "tta.json", tmp_path / "twice.json"
    common = ["--data", data, "--no-progress"]
    assert main(["export", "--checkpoint", checkpoint, "--output", str(plain), *common]) == 0
    assert (
        main(
            [
                "export",
                "--checkpoint",
                checkpoint,
                "--tta",
                "--merge-iou",
                "0.5",
                "--output",
                str(tta),
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tta_flips: hflip,vflip" in out and "models: 1" in out
    results = json.loads(tta.read_text())
    assert results
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = mapping_coco(workspace["data"]).loadRes(copy.deepcopy(results))
    assert len(loaded.getAnnIds()) == len(results)
    provenance = json.loads((tmp_path / "tta.provenance.json").read_text())
    assert provenance["tta_flips"] == ["hflip", "vflip"] and provenance["merge_iou_threshold"] == 0.5
    assert provenance["ensemble"] is None and provenance["checkpoint"] == checkpoint

    assert (
        main(
            [
                "export",
                "--checkpoint",
                checkpoint,
                "--checkpoint",
                checkpoint,
                "--output",
                str(twice),
                *common,
            ]
        )
        == 0
    )
    assert "models: 2" in capsys.readouterr().out
    assert segmentations(twice) == segmentations(plain)
    provenance = json.loads((tmp_path / "twice.provenance.json").read_text())
    assert [m["checkpoint"] for m in provenance["ensemble"]] == [checkpoint, checkpoint]

    # (a successful --best export would log artifacts to the shared runs: the K best runs
    # themselves are tests/test_best_run.py's)
    mlflow = ["--experiment", EXPERIMENT, "--tracking-uri", workspace["uri"]]
    assert (
        main(
            [
                "export",
                "--best",
                "--search",
                "r1",
                "--ensemble",
                "2",
                *mlflow,
                "--output",
                str(tmp_path / "no.json"),
                *common,
            ]
        )
        == 2
    )
    assert "--ensemble 2 needs 2 runs" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--checkpoint",
                checkpoint,
                "--ensemble",
                "2",
                "--output",
                str(tmp_path / "no.json"),
                *common,
            ]
        )
        == 2
    )
    assert "add --best" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--checkpoint",
                checkpoint,
                "--tta",
                "rot90",
                "--output",
                str(tmp_path / "no.json"),
                *common,
            ]
        )
        == 2
    )
    assert "'rot90'" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--checkpoint",
                checkpoint,
                "--tta",
                "--merge-iou",
                "1.5",
                "--output",
                str(tmp_path / "no.json"),
                *common,
            ]
        )
        == 2
    )
    assert "must lie in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


# ----------------------------------------------------------------------------- tune-inference


def test_tune_inference_then_export_uses_the_tuned_settings(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """tune-inference --best on a run of its own experiment (r1's checkpoint, so the shared runs
    stay as they are): a child run with the settings, AP50 before and after, the paired-bootstrap
    share and a plot; inference.json beside the checkpoint only when improved, tied to the
    checkpoint and the data; export predicts with it unless --no-tuned-settings, and refuses it
    once the checkpoint changed."""
    tracker, client = Tracker(workspace["uri"]), workspace["client"]
    state = load_checkpoint(checkpoint_of(workspace, "r1"))
    cfg = checkpoint_config(state)
    run_dir = tmp_path / "t1"
    run_dir.mkdir()
    shutil.copy(checkpoint_of(workspace, "r1"), run_dir / "best.pt")
    fingerprint = dataset_fingerprint(cfg.data)
    run_id = tracker.start_run(
        "tune",
        "t1",
        params=flatten(cfg),
        tags={SOURCE_TAG: "train", RUN_DIR_TAG: str(run_dir)},
        dataset=fingerprint,
    )
    tracker.finish_run(run_id, run_dir, cfg, 0.5)
    data = str(workspace["data"])
    mlflow = ["--tracking-uri", workspace["uri"], "--no-progress"]
    code = main(
        [
            "tune-inference",
            "--best",
            "--data",
            data,
            "--scales",
            "1",
            "1.25",
            "--trials",
            "6",
            "--experiment",
            "tune",
            *mlflow,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"run_id: {run_id}" in captured.out and "trials: 6" in captured.out
    tune_run = client.get_run(re.search(r"^tune_inference_run: (\w+)$", captured.out, re.M).group(1))
    assert tune_run.data.tags["mlflow.parentRunId"] == run_id
    assert tune_run.data.tags[SOURCE_TAG] == "tune-inference" and tune_run.info.status == "FINISHED"
    assert {"settings.score_threshold", "settings.nms_iou", "settings.detections", "settings.scales"} <= set(
        tune_run.data.params
    )
    metrics = tune_run.data.metrics
    assert metrics["val_segm_AP50_best_trial"] >= 0 and metrics["val_segm_AP50_trained"] == 0.5
    assert 0 <= metrics["share_at_least_before"] <= 1
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id)}
    assert {"inference.json", "inference-search.png"} <= artifacts
    saved = json.loads(
        Path(client.download_artifacts(tune_run.info.run_id, "inference.json", str(tmp_path))).read_text()
    )
    assert (
        saved["tuned_run"] == run_id
        and saved["settings"]["cache_detections"] == 2 * cfg.model.detections_per_img
    )
    assert saved["checkpoint_sha256"] == [file_sha256(run_dir / "best.pt")]
    assert saved["data_fingerprint"] == fingerprint.digest
    improved = saved["improved"]
    assert saved["validation_segm_AP50_after"] == (
        metrics["val_segm_AP50_best_trial"] if improved else metrics["val_segm_AP50_before"]
    )
    shipped = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert ("checkpoint/inference.json" in shipped) == improved
    assert not (run_dir / "inference.json").exists()  # no local copy: nothing would read it

    # settings that keep almost nothing, beside the checkpoint: export ships what they say
    forced = write_settings(
        tmp_path / "forced" / "inference.json",
        InferenceSettings(score_threshold=0.999, cache=CacheSettings(detections=200)),
        {
            "tuned_run": run_id,
            "checkpoint_sha256": saved["checkpoint_sha256"],
            "data_fingerprint": fingerprint.digest,
        },
    )
    tracker.log_artifact(run_id, forced, "checkpoint")
    output = tmp_path / "tuned.json"
    export = ["export", "--run-id", run_id, "--data", data, "--output", str(output), *mlflow]
    assert main(export) == 0
    out = capsys.readouterr().out
    assert "inference_settings: tuned (scales=1 " in out and "score>0.999" in out
    tuned_detections = int(re.search(r"^detections: (\d+)$", out, re.M).group(1))
    provenance = json.loads((tmp_path / "tuned.provenance.json").read_text())
    assert provenance["inference_settings"]["score_threshold"] == 0.999
    assert main([*export, "--no-tuned-settings"]) == 0
    out = capsys.readouterr().out
    assert "inference_settings: the model's own (--no-tuned-settings)" in out
    assert int(re.search(r"^detections: (\d+)$", out, re.M).group(1)) > tuned_detections
    assert main([*export, "--tta"]) == 2
    assert "--no-tuned-settings" in capsys.readouterr().err

    # a new best.pt under the same run (a resumed run): the settings no longer apply
    shutil.copy(checkpoint_of(workspace, "r2"), run_dir / "best.pt")
    tracker.log_outcome(run_id, run_dir, cfg, 0.5)
    assert main(export) == 2
    err = capsys.readouterr().err
    assert "checkpoint_sha256" in err and "--no-tuned-settings" in err
    assert f"cellseg tune-inference --run-id {run_id}" in err

    # --run-id tunes in the run's own experiment ("tune", not the default "cellseg")
    retune = [
        "tune-inference",
        "--run-id",
        run_id,
        "--sampler",
        "grid",
        "--trials",
        "3",
        "--no-tta",
        "--scales",
        "1",
    ]
    assert main([*retune, *mlflow]) == 0
    out = capsys.readouterr().out
    assert "trials: 3" in out
    second = client.get_run(re.search(r"^tune_inference_run: (\w+)$", out, re.M).group(1))
    assert second.info.experiment_id == client.get_experiment_by_name("tune").experiment_id
    improved = "improved: yes" in out
    shipped = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert ("checkpoint/inference.json" in shipped) == improved  # the stale one replaced or removed
    assert main(export) == 0  # either way nothing stale is left to refuse
    expected = (
        "inference_settings: tuned (" if improved else "inference_settings: the model's own (the run has none"
    )
    assert expected in capsys.readouterr().out
    assert main([*retune, "--experiment", "cellseg", *mlflow]) == 2
    assert "is in experiment 'tune'" in capsys.readouterr().err


def test_tune_inference_checks_its_input_before_opening_a_run_or_predicting(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Bad flags, other data, a refit and a cache above its bound end with exit code 2 and no
    tune-inference run; the library refuses 0 trials or detections before choosing a run."""
    tracker, client = Tracker(workspace["uri"]), workspace["client"]
    run_id = run_of(workspace, "r1").info.run_id
    mlflow = ["--tracking-uri", workspace["uri"], "--no-progress"]

    def tune_runs() -> int:
        return len(
            client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                "tags.`cellseg.source` = 'tune-inference'",
            )
        )

    before = tune_runs()
    for flag in ("--trials", "--cache-detections"):
        with pytest.raises(SystemExit) as exited:
            main(["tune-inference", "--run-id", run_id, flag, "0", *mlflow])
        assert exited.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    for given in ({"trials": 0}, {"cache_detections": -5}):
        with pytest.raises(ConfigError, match="give 1 or more"):
            tune_inference(
                tracker,
                experiment=None,
                run_id="no-such-run",
                search=None,
                data_root=None,
                scratch=tmp_path,
                **given,
            )
    other = tmp_path / "other"
    assert main(["synth", str(other), "--train", "8", "--test", "1", "--seed", "6", "--profile", "easy"]) == 0
    capsys.readouterr()
    assert main(["tune-inference", "--run-id", run_id, "--data", str(other), *mlflow]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main(["tune-inference", "--run-id", run_id, "--max-cache-mb", "0.01", *mlflow]) == 2
    assert "--max-cache-mb" in capsys.readouterr().err

    refit_dir = tmp_path / "refit"
    refit_dir.mkdir()
    state = load_checkpoint(checkpoint_of(workspace, "r1"))
    state["config"]["data"]["val_fraction"] = 0.0
    save_checkpoint(refit_dir / "best.pt", state)
    refit = tracker.start_run(EXPERIMENT, "refit-r1", tags={SOURCE_TAG: "refit"})
    tracker.finish_run(refit, refit_dir, checkpoint_config(state), float("nan"))
    assert main(["tune-inference", "--run-id", refit, *mlflow]) == 2
    assert "tune its source run" in capsys.readouterr().err
    assert tune_runs() == before


def test_a_trial_chosen_by_run_id_names_its_search(workspace: dict, tmp_path: Path) -> None:
    tracker = Tracker(workspace["uri"])
    parent = tracker.start_run("named", "search-parent", tags={SEARCH_TAG: "s-named"})
    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    shutil.copy(checkpoint_of(workspace, "r2"), run_dir / "best.pt")
    trial = tracker.start_run("named", "trial_0", parent_run_id=parent)
    tracker.finish_run(trial, run_dir, checkpoint_config(load_checkpoint(run_dir / "best.pt")), 0.1)
    _, _, provenance = chosen_run(
        tracker, run_id=trial, search=None, experiment="named", data_root=None, scratch=tmp_path
    )
    assert provenance["search"] == "s-named"


def test_tune_inference_of_an_ensemble_then_export_uses_its_settings(
    workspace: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """tune-inference --best --ensemble 2 on a search of its own experiment (trials holding r1's
    and r2's checkpoints): the single best against the ensemble recorded, the settings file naming
    the members; export --best --ensemble 2 uses it while the same runs are chosen, and not once
    the second best changes; members validated on different splits are refused by name."""
    tracker = Tracker(workspace["uri"])
    cfg = checkpoint_config(load_checkpoint(checkpoint_of(workspace, "r1")))
    parent = tracker.start_run("ens", "s1", tags={SOURCE_TAG: "search-parent", SEARCH_TAG: "s1"})

    def trial(name: str, source: str, value: float, trial_cfg=cfg) -> str:
        run_dir = tmp_path / name
        run_dir.mkdir()
        shutil.copy(checkpoint_of(workspace, source), run_dir / "best.pt")
        run_id = tracker.start_run(
            "ens",
            name,
            params=flatten(trial_cfg),
            tags={SOURCE_TAG: "search"},
            parent_run_id=parent,
            dataset=dataset_fingerprint(trial_cfg.data),
        )
        tracker.finish_run(run_id, run_dir, trial_cfg, value)
        return run_id

    first, second = trial("a", "r1", 0.6), trial("b", "r2", 0.5)
    data = str(workspace["data"])
    mlflow = ["--experiment", "ens", "--tracking-uri", workspace["uri"], "--no-progress"]
    tune = ["tune-inference", "--best", "--data", data, "--ensemble", "2", "--no-tta", *mlflow]
    code = main([*tune, "--scales", "1", "1.25", "--trials", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"members: {first} (a), {second} (b)" in captured.out
    tune_run = workspace["client"].get_run(
        re.search(r"^tune_inference_run: (\w+)$", captured.out, re.M).group(1)
    )
    assert tune_run.data.tags["mlflow.parentRunId"] == parent
    assert tune_run.data.params["members"] == f"{first},{second}" and tune_run.data.params["ensemble"] == "2"
    metrics = tune_run.data.metrics
    assert {"val_segm_AP50_single", "val_segm_AP50_ensemble_2"} <= set(metrics)
    best_of_sizes = max(metrics["val_segm_AP50_single"], metrics["val_segm_AP50_ensemble_2"])
    # the single best counts the model's own settings, which the search's best trial can miss
    assert best_of_sizes >= max(metrics["val_segm_AP50_best_trial"], metrics["val_segm_AP50_before"])
    assert metrics["val_segm_AP50_single"] >= metrics["val_segm_AP50_before"]
    improved = metrics["improved"] == 1
    assert metrics["val_segm_AP50_after"] == (best_of_sizes if improved else metrics["val_segm_AP50_before"])
    saved_file = tracker.download_artifact(
        tune_run.info.run_id, "inference-ensemble2.json", tmp_path / "saved"
    )
    saved = json.loads(saved_file.read_text())
    assert saved["members"] == [first, second] and saved["tuned_run"] == first
    assert saved["checkpoint_sha256"] == [file_sha256(tmp_path / name / "best.pt") for name in "ab"]
    shipped = {a.path for a in workspace["client"].list_artifacts(first, "checkpoint")}
    assert ("checkpoint/inference-ensemble2.json" in shipped) == improved
    if not improved:  # what export does with an ensemble's settings, shipped by hand
        tracker.log_artifact(first, saved_file, "checkpoint")
    models = saved["settings"]["models"]

    output = tmp_path / "ensemble.json"
    export = ["export", "--best", "--data", data, "--ensemble", "2", "--output", str(output), *mlflow]
    assert main(export) == 0
    out = capsys.readouterr().out
    assert "inference_settings: tuned (scales=" in out and f"models: {models}\n" in out
    provenance = json.loads((tmp_path / "ensemble.provenance.json").read_text())
    assert provenance["inference_settings"]["models"] == models
    assert provenance["inference_settings"]["scales"] == saved["settings"]["scales"]
    assert main([*export, "--merge-iou", "0.5"]) == 2
    assert "--no-tuned-settings" in capsys.readouterr().err

    third = trial("c", "r2", 0.55)  # now the second best: the settings were tuned for others
    assert main(export) == 0
    assert (
        f"the model's own (inference-ensemble2.json of run {first} was tuned for runs {first}, {second}, "
        f"but the runs chosen now are {first}, {third}" in capsys.readouterr().out
    )

    other_split = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, split_seed=cfg.data.split_seed + 1)
    )
    fourth = trial("d", "r1", 0.9, other_split)
    assert main([*tune, "--scales", "1", "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "different splits" in err and f"{fourth} (d)" in err and f"{first} (a)" in err


# ----------------------------------------------------------------------------- real data


def test_inspect_real_data(realdata_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(realdata_root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_train_images"] == 51
    assert stats["num_test_images"] == 31
    assert stats["max_instances_per_image"] > 0
    assert set(stats["instances_per_class"]) == {f"class{c}" for c in range(1, 5)}
