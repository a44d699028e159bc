"""Dataset statistics for `cellseg inspect`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cellseg.data import dataset_stats, format_stats, load_sample, scan_train


def _counts(root: Path) -> tuple[list[int], list[int]]:
    """Instances per class and per image, counted from the decoded label maps."""
    per_class, per_image = [0] * 4, []
    for item in scan_train(root):
        _, label_maps = load_sample(item)
        counts = [len(np.unique(m)) - 1 for m in label_maps]
        per_class = [a + b for a, b in zip(per_class, counts)]
        per_image.append(sum(counts))
    return per_class, per_image


def test_stats_match_decoded_masks(synth_root: Path) -> None:
    stats = dataset_stats(synth_root, 500, progress=False)
    per_class, per_image = _counts(synth_root)
    assert stats["num_train_images"] == 8 and stats["num_test_images"] == 4
    assert [v["instances"] for v in stats["instances_per_class"].values()] == per_class
    assert stats["max_instances_per_image"] == max(per_image) == stats["instances_per_image"]["max"]
    assert stats["instances_per_image"]["median"] == np.median(per_image)
    assert stats["test_image_size"]["height"]["min"] == 33
    assert stats["image_size"]["width"]["max"] <= 400
    for name, p in stats["area_percentiles"].items():
        values = list(p.values())
        if stats["instances_per_class"][name]["instances"]:
            assert values == sorted(values) and values[0] > 0
        else:
            assert values == [None] * 5
    assert not any("detections_per_img" in w for w in stats["warnings"])


def test_warns_above_detections_per_img(synth_root: Path) -> None:
    _, per_image = _counts(synth_root)
    limit = sorted(per_image)[-2]  # only the densest image exceeds it
    stats = dataset_stats(synth_root, limit, progress=False)
    flagged = [w for w in stats["warnings"] if "detections_per_img" in w]
    busiest = scan_train(synth_root)[int(np.argmax(per_image))]
    assert len(flagged) == 1 and str(busiest.folder) in flagged[0]
    assert f"{max(per_image)} instances" in flagged[0]


def test_no_mapping_means_no_test_images(tmp_path: Path, synth_root: Path) -> None:
    shutil.copytree(synth_root / "train", tmp_path / "train")
    stats = dataset_stats(tmp_path, 500, progress=False)
    assert stats["num_test_images"] == 0 and stats["test_image_size"] == {}
    assert "test images: 0" in format_stats(stats)


def test_format_and_progress(synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    text = format_stats(dataset_stats(synth_root, 10))
    assert "scanning train" in capsys.readouterr().err
    for name in ("class1", "class2", "class3", "class4", "area p50", "warning:"):
        assert name in text


def test_real_data(realdata_root: Path) -> None:
    stats = dataset_stats(realdata_root, 500, progress=False)
    assert stats["num_train_images"] == 51 and stats["num_test_images"] == 31
    assert stats["test_image_size"]["height"]["min"] == 33
    assert stats["max_instances_per_image"] > 255
