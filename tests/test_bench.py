"""Smoke tests of the benchmark scripts: each runs with --tiny and prints its ratio line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
RATIO = re.compile(r"^ratio .+: [-+]?\d+(\.\d+)?(x| %)$", re.MULTILINE)


@pytest.mark.parametrize(
    "script",
    [
        "train_throughput",
        "eval_share",
        "export_memory",
        "data_loading",
        "tune_overhead",
        "reseed_choice",
        "search_efficiency",
        "store_writes",
        "mixed_precision",
        "checkpoint_save",
        "mask_upsample",
        "rung_agreement",
        "tpe_history",
    ],
)
def test_benchmark_runs_tiny_and_prints_its_ratio(script: str) -> None:
    proc = run_tiny(script)
    assert RATIO.search(proc.stdout), proc.stdout


def test_train_throughput_against_a_setting_runs_it_as_a_third_loop() -> None:
    proc = run_tiny("train_throughput", "--epochs", "1", "--against", "data.batch_by_orientation=false")
    assert re.search(r"^against +\d+ ", proc.stdout, re.MULTILINE), proc.stdout
    ratio = r"^ratio seconds cellseg/cellseg with data.batch_by_orientation=false: \d+\.\d+x$"
    assert re.search(ratio, proc.stdout, re.MULTILINE), proc.stdout


def test_driver_scale_profiles_each_bucket_and_names_what_grew(tmp_path: Path) -> None:
    profile = tmp_path / "driver.prof"
    proc = run_tiny("driver_scale", "--profile", str(profile))
    assert RATIO.search(proc.stdout), proc.stdout
    table = proc.stdout.split("what grew:", 1)[1].splitlines()
    assert table[1].split()[1:] == ["1-1", "2-3", "4-12"], proc.stdout  # a column per bucket
    assert any(re.search(r"\.py:\d+\(\w+\)", row) for row in table[2:6]), proc.stdout  # functions
    assert profile.stat().st_size > 0


def test_driver_scale_without_mlflow_writes_counts_every_result_and_records_no_trial() -> None:
    proc = run_tiny("driver_scale", "--no-mlflow-writes")
    assert RATIO.search(proc.stdout), proc.stdout
    ended = re.search(r"^12 trials ended, (\d+) results, (\d+) runs exportable", proc.stdout, re.MULTILINE)
    assert ended and int(ended[1]) >= 12 and ended[2] == "0", proc.stdout


def run_tiny(script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``bench/<script>.py --tiny`` with ``flags``, asserted to exit 0."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--tiny", *flags],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_real_second_stage_holds_out_training_folders_as_a_scored_test_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/real_second_stage.py's split: the held-out folders become test images with their own
    masks as ground truth, so a submission of those masks scores AP50 1 and the rest train."""
    import json

    import numpy as np

    from cellseg.commands import score_export
    from cellseg.data import make_synthetic_dataset, scan_train
    from cellseg.data.layout import load_test_images
    from cellseg.data.sample import load_label_maps
    from cellseg.data.targets import targets_from_label_maps
    from cellseg.evaluation import ImagePrediction, coco_results
    from cellseg.rle import encode_mask

    monkeypatch.syspath_prepend(str(BENCH))
    import real_second_stage

    source = make_synthetic_dataset(tmp_path / "real", 6, 0, seed=3, profile="medium")
    data = real_second_stage.split_real(source, tmp_path / "out", 2, seed=0)
    held_out = {item.folder.name for item in scan_train(source)} - {
        item.folder.name for item in scan_train(data)
    }
    test_images = load_test_images(data)
    assert len(held_out) == 2 and {Path(t.file_name).stem for t in test_images} == held_out
    results = []
    for test_image in test_images:  # the held-out folders' own masks as the submission
        folder = source / "train" / Path(test_image.file_name).stem
        [item] = [i for i in scan_train(source) if i.folder == folder]
        shape = (test_image.height, test_image.width)
        target = targets_from_label_maps(load_label_maps(item.class_paths, shape))
        masks, n = target["masks"], len(target["labels"])
        prediction = ImagePrediction(
            target["boxes"], target["labels"], np.ones(n), [encode_mask(m) for m in masks]
        )
        results += coco_results(test_image.image_id, prediction)
    (tmp_path / "perfect.json").write_text(json.dumps(results))
    assert score_export(tmp_path / "perfect.json", data)["segm_AP50"] == pytest.approx(1.0)
    (tmp_path / "empty.json").write_text("[]")
    assert score_export(tmp_path / "empty.json", data)["segm_AP50"] == 0.0
