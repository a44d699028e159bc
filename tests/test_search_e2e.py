"""A real search end to end: Ray Tune + Optuna + ASHA on synthetic data, recorded in MLflow."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re

import optuna
import pytest
import ray
from pycocotools.coco import COCO

from cellseg.cli import main as cellseg_main
from cellseg.config import DataConfig
from cellseg.data import dataset_fingerprint, load_test_images
from search.asha_fidelity import rung_epochs
from search.run import main as search_main
from search.study_file import JOURNAL_FILE, open_study_storage
from search.trial_runs import TRIAL_TAG
from searchutil import epochs_of, search_args, search_runs, tied_at

pytestmark = pytest.mark.slow

NUM_SAMPLES = 5
MAX_EPOCHS = 3
GRACE_PERIOD, REDUCTION_FACTOR = 1, 2  # ASHA's rungs at epochs 1 and 2
KEEP_TOP = 2


@pytest.fixture(scope="module")
def search(tmp_path_factory, easy_root, synth_root, tiny_search):
    """One finished search: 5 trials, ASHA with reduction factor 2, the checkpoints of the best 2
    kept, on 2 CPUs; then, in the same store, a one-trial, one-epoch search "other" on other data
    (the realistic synthetic layout), followed by its inference-settings search (--tune-inference,
    3 settings)."""
    folder = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = search_main(
                search_args(
                    easy_root,
                    tiny_search,
                    folder / "storage",
                    uri,
                    "e2e",
                    "s1",
                    "--num-samples",
                    str(NUM_SAMPLES),
                    "--grace-period",
                    str(GRACE_PERIOD),
                    "--reduction-factor",
                    str(REDUCTION_FACTOR),
                    "--seed",
                    "7",
                    "--keep-top",
                    str(KEEP_TOP),
                )
            )
        other_code = search_main(
            search_args(
                synth_root,
                tiny_search,
                folder / "storage",
                uri,
                "e2e",
                "other",
                "--num-samples",
                "1",
                "--max-epochs",
                "1",
                "--ci-top",
                "0",
                "--tune-inference",
                "3",
            )
        )
    finally:
        ray.shutdown()
    assert code == 0 and other_code == 0
    client, [parent], children = search_runs(uri, "e2e", "s1")
    _, [other_parent], other_children = search_runs(uri, "e2e", "other")
    return {
        "folder": folder,
        "uri": uri,
        "client": client,
        "parent": parent,
        "children": children,
        "data": easy_root,
        "other_children": other_children,
        "other_data": synth_root,
        "printed": printed.getvalue(),
    }


def test_every_trial_is_a_child_run_with_params_and_per_epoch_metrics(search):
    client, children = search["client"], search["children"]
    fingerprint = dataset_fingerprint(DataConfig(root=str(search["data"]))).digest
    assert search["parent"].data.tags["cellseg.data_fingerprint"] == fingerprint
    experiment = client.get_experiment(search["parent"].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert search["parent"].info.status == "FINISHED"
    assert len(children) == NUM_SAMPLES
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == NUM_SAMPLES
    for child in children:
        assert "optim.lr" in child.data.params and "model.backbone" in child.data.params
        epochs = epochs_of(client, child)
        assert epochs == list(range(1, len(epochs) + 1)) and epochs
        assert "best_segm_AP50" in child.data.metrics
        assert child.data.tags["cellseg.data_fingerprint"] == fingerprint
        assert [d.dataset.digest for d in child.inputs.dataset_inputs] == [fingerprint]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "config.yaml" in artifacts
        assert ("checkpoint" in artifacts) != ("cellseg.checkpoint_dropped" in child.data.tags)
        expected = "FINISHED" if len(epochs) == MAX_EPOCHS else "KILLED"
        assert child.info.status == expected
        # a trial draws its pictures at its last epoch (the worker imports the plotting then)
        assert ("pictures" in artifacts) == (expected == "FINISHED")


def test_only_the_best_trials_keep_their_checkpoint_stored_once_in_mlflow(search):
    children, folder = search["children"], search["folder"]
    kept = [c for c in children if "cellseg.checkpoint_dropped" not in c.data.tags]
    dropped = [c for c in children if c not in kept]
    assert len(kept) == KEEP_TOP and len(dropped) == NUM_SAMPLES - KEEP_TOP
    assert min(c.data.metrics["best_segm_AP50"] for c in kept) >= max(
        c.data.metrics["best_segm_AP50"] for c in dropped
    )
    for child in dropped:
        assert child.data.tags["cellseg.checkpoint_dropped"] == "not among the 2 best trials by segm_AP50"
        assert "optim.lr" in child.data.params and "best_segm_AP50" in child.data.metrics
    on_disk = {p.parts[-4] for p in (folder / "mlartifacts").rglob("checkpoint/best.pt")}
    assert on_disk & {c.info.run_id for c in children} == {c.info.run_id for c in kept}
    assert not list((folder / "storage" / "s1").rglob("*.pt")), "Tune's storage kept a second copy"
    trial_dirs = [d for d in (folder / "storage" / "s1").iterdir() if d.name.startswith("trial_")]
    assert len(trial_dirs) == NUM_SAMPLES and all((d / "result.json").is_file() for d in trial_dirs)
    unread = [
        p.name for d in trial_dirs for p in d.iterdir() if p.name == "progress.csv" or "tfevents" in p.name
    ]
    assert not unread, "Tune's CSV and TensorBoard loggers ran"
    parent = search["parent"]
    assert 0 < parent.data.metrics["useful_share"] <= 1 and parent.data.metrics["trial_slots"] == 2
    top = max(c.data.metrics["best_segm_AP50"] for c in kept)
    best = {c.info.run_id for c in kept if c.data.metrics["best_segm_AP50"] == top}
    assert parent.data.tags["best_checkpoint"] in {f"runs:/{run_id}/checkpoint/best.pt" for run_id in best}


def test_asha_stopped_some_trials_and_the_summary_counts_the_saved_epochs(search):
    client, children = search["client"], search["children"]
    epochs = [len(epochs_of(client, c)) for c in children]
    if tied_at(client, children, rung_epochs(GRACE_PERIOD, REDUCTION_FACTOR, MAX_EPOCHS)):
        assert min(epochs) == MAX_EPOCHS, f"ASHA stopped a trial on a tie: epochs per trial {epochs}"
    else:
        assert min(epochs) < MAX_EPOCHS, f"ASHA stopped no trial: epochs per trial {epochs}"
    metrics = search["parent"].data.metrics
    assert metrics["epochs_run"] == sum(epochs)
    assert metrics["epochs_saved"] == NUM_SAMPLES * MAX_EPOCHS - sum(epochs)
    summary = {a.path for a in client.list_artifacts(search["parent"].info.run_id, "summary")}
    assert "summary/trial_curves.png" in summary


def test_optuna_sees_asha_stopped_trials_as_pruned_with_their_epochs(search):
    study = optuna.load_study(
        study_name="s1", storage=open_study_storage(search["folder"] / "storage" / "s1" / JOURNAL_FILE)
    )
    by_lr = {t.params["optim.lr"]: t for t in study.trials}
    client = search["client"]
    for child in search["children"]:
        trial = by_lr[float(child.data.params["optim.lr"])]
        epochs = epochs_of(client, child)
        assert sorted(trial.intermediate_values) == epochs
        if len(epochs) < MAX_EPOCHS:
            assert trial.state == optuna.trial.TrialState.PRUNED
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE


def test_parameter_importances_are_written_to_the_parent_run(search):
    study = optuna.load_study(
        study_name="s1", storage=open_study_storage(search["folder"] / "storage" / "s1" / JOURNAL_FILE)
    )
    expected = optuna.importance.get_param_importances(study)
    assert expected, "too few completed trials for importances: the test search is too small"
    parent = search["parent"]
    logged = {
        k.removeprefix("importance."): v
        for k, v in parent.data.metrics.items()
        if k.startswith("importance.")
    }
    assert logged == pytest.approx(expected)
    text = search["client"].download_artifacts(parent.info.run_id, "summary/param_importances.txt")
    assert [line.split(":")[0] for line in open(text).read().splitlines()] == list(expected)


def test_the_top_trials_get_a_bootstrap_interval_in_their_runs_the_table_and_the_plot(search):
    """--ci-top 5 (the default) covers all 5 trials, but --keep-top 2 left only 2 checkpoints: the
    table names the other 3 with the reason their checkpoints were dropped."""
    client, parent = search["client"], search["parent"]
    # export --best's order: a tie goes to the earlier trial
    children = sorted(
        search["children"], key=lambda c: (-c.data.metrics["best_segm_AP50"], c.info.start_time)
    )
    kept = [c for c in children if "cellseg.checkpoint_dropped" not in c.data.tags]
    for child in children:
        assert ("segm_AP50_ci95_low" in child.data.metrics) == (child in kept)
    for child in kept:
        low, high = child.data.metrics["segm_AP50_ci95_low"], child.data.metrics["segm_AP50_ci95_high"]
        assert 0.0 <= low <= high <= 1.0
    assert parent.data.metrics["best_segm_AP50_ci95_low"] == kept[0].data.metrics["segm_AP50_ci95_low"]
    assert "segm_AP50_share_at_least_best" in kept[1].data.metrics
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/top_intervals.png", "summary/top_intervals.txt"} <= summary
    printed = search["printed"]
    assert f"top {KEEP_TOP} by segm_AP50, 95% interval of segm_AP50 from 1000 bootstrap resamples" in printed
    best = kept[0]
    row = f"{best.data.metrics['best_segm_AP50']:>10.4f}  [{best.data.metrics['segm_AP50_ci95_low']:.4f}, "
    assert row in printed
    reason = f"its checkpoint was dropped by --keep-top (not among the {KEEP_TOP} best trials by segm_AP50)"
    [names] = re.findall(rf"no interval for (.+?): {re.escape(reason)}$", printed, flags=re.MULTILINE)
    assert set(names.split(", ")) == {c.info.run_name for c in children if c not in kept}
    assert not any("segm_AP50_ci95_low" in c.data.metrics for c in search["other_children"])  # --ci-top 0


def test_asha_fidelity_counts_the_finished_trials_and_gives_a_number_only_from_five(search):
    finished = [c for c in search["children"] if c.info.status == "FINISHED"]
    metrics = search["parent"].data.metrics
    assert metrics["asha_fidelity_trials"] == len(finished)
    rungs = {k for k in metrics if k.startswith("asha_spearman_epoch_")}
    client = search["client"]
    ranked = len(finished) >= 5 and len({c.data.metrics["best_segm_AP50"] for c in finished}) > 1
    # no number from a rung where every finished trial scored the same (all 0.0 on some CPUs)
    expected = {
        f"asha_spearman_epoch_{e}"
        for e in rung_epochs(GRACE_PERIOD, REDUCTION_FACTOR, MAX_EPOCHS)
        if ranked and not tied_at(client, finished, [e])
    }
    assert rungs == expected
    assert "ASHA rung at epoch 1: " in search["printed"] and "ASHA rung at epoch 2: " in search["printed"]


def test_report_a_baseline_runs_first(search):
    first = min(search["children"], key=lambda r: r.info.start_time)
    assert first.data.params["optim.name"] == "sgd"
    assert float(first.data.params["optim.lr"]) == pytest.approx(0.005)
    assert float(first.data.params["optim.momentum"]) == pytest.approx(0.9)


def test_export_best_writes_a_submission_pycocotools_accepts(search, tmp_path):
    output = tmp_path / "test-results.json"
    code = cellseg_main(
        [
            "export",
            "--best",
            "--experiment",
            "e2e",
            "--tracking-uri",
            search["uri"],
            "--data",
            str(search["data"]),
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0
    images = load_test_images(search["data"])
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": t.image_id, "height": t.height, "width": t.width} for t in images],
        "categories": [{"id": i} for i in range(1, 5)],
        "annotations": [],
    }
    ground_truth.createIndex()
    results = json.loads(output.read_text())
    assert results, "the best model predicted nothing on the test images"
    assert len(ground_truth.loadRes(copy.deepcopy(results)).getAnnIds()) == len(results)
    assert {r["image_id"] for r in results} <= {t.image_id for t in images}
    provenance = json.loads((tmp_path / "test-results.provenance.json").read_text())
    children = {c.info.run_id: c for c in search["children"]}
    assert provenance["run_id"] in children and provenance["search"] == "s1"
    assert provenance["metric_value"] == max(c.data.metrics["best_segm_AP50"] for c in children.values())
    assert provenance["fingerprint"] == search["parent"].data.tags["cellseg.data_fingerprint"]
    exported = {a.path for a in search["client"].list_artifacts(provenance["run_id"], "export")}
    assert "export/test-results.json" in exported


def test_the_inference_search_after_a_search_is_a_child_of_its_parent(search):
    """--tune-inference: a run nested under the search's parent, naming the best trial, whose
    checkpoint/ artifacts then hold inference.json when the tuned settings improved."""
    [tuning] = [c for c in search["other_children"] if c.data.tags["cellseg.source"] == "tune-inference"]
    [trial] = [c for c in search["other_children"] if c is not tuning]
    assert tuning.data.tags["cellseg.tuned_run"] == trial.info.run_id and tuning.info.status == "FINISHED"
    assert tuning.data.params["trials"] == "3" and "val_segm_AP50_after" in tuning.data.metrics
    checkpoint = {a.path for a in search["client"].list_artifacts(trial.info.run_id, "checkpoint")}
    assert ("checkpoint/inference.json" in checkpoint) == (tuning.data.metrics["improved"] == 1)


def test_export_best_follows_the_data_across_searches_in_one_store(search, tmp_path, capsys):
    """The newer search "other" trained on other data: --data picks the search trained on it, and
    --search names one only when it matches --data; its best trial's tuned settings are used."""
    common = ["--experiment", "e2e", "--tracking-uri", search["uri"], "--no-progress"]
    for data, children, name in (
        (search["data"], search["children"], "s1"),
        (search["other_data"], search["other_children"], "other"),
    ):
        output = tmp_path / name / "test-results.json"
        assert cellseg_main(["export", "--best", "--data", str(data), "--output", str(output), *common]) == 0
        provenance = json.loads(output.with_name("test-results.provenance.json").read_text())
        assert provenance["search"] == name
        assert provenance["run_id"] in {c.info.run_id for c in children}
        tuned = provenance["inference_settings"]
        [tuning] = [c for c in search["other_children"] if c.data.tags["cellseg.source"] == "tune-inference"]
        shipped = name == "other" and tuning.data.metrics["improved"] == 1  # only improved settings ship
        assert (tuned and tuned["tuned_run"]) == (provenance["run_id"] if shipped else None)
    capsys.readouterr()
    output = tmp_path / "refused.json"
    assert (
        cellseg_main(
            [
                "export",
                "--best",
                "--search",
                "s1",
                "--data",
                str(search["other_data"]),
                "--output",
                str(output),
                *common,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "named 's1'" in err and "search 's1': " in err and "search 'other': 1 exportable" in err
    assert not output.exists()
