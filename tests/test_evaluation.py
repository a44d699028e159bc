"""COCO evaluation on synthetic masks: perfect predictions score 1, misses and empties lower it."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.evaluation import (
    ImagePrediction,
    ImageTruth,
    coco_metrics,
    coco_results,
    ground_truth_coco,
    load_results,
    score_results_file,
    truth_from_masks,
)
from cellseg.rle import encode_region
from cellseg.task import metric_names


def grid_masks(count: int, height: int, width: int, cell: int = 8) -> np.ndarray:
    """``count`` disjoint square instances laid out on a grid."""
    per_row = width // (cell + 2)
    masks = np.zeros((count, height, width), dtype=np.uint8)
    for i in range(count):
        y, x = divmod(i, per_row)
        masks[i, y * (cell + 2) : y * (cell + 2) + cell, x * (cell + 2) : x * (cell + 2) + cell] = 1
    return masks


def perfect(truth: ImageTruth) -> ImagePrediction:
    """The ground truth as predictions with score 1."""
    boxes = np.array([mask_utils.toBbox(r) for r in truth.rles]).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return ImagePrediction(boxes, truth.labels.copy(), np.ones(len(truth.rles)), list(truth.rles))


@pytest.fixture
def truths() -> list[ImageTruth]:
    first = truth_from_masks(1, grid_masks(8, 40, 50), np.array([1, 2, 3, 4, 1, 2, 3, 4]))
    second = truth_from_masks(2, grid_masks(3, 30, 30), np.array([2, 2, 4]))
    return [first, second]


def test_ground_truth_as_predictions_scores_one(truths):
    metrics = coco_metrics(truths, {t.image_id: perfect(t) for t in truths})
    for key in ("segm_AP50", "segm_AP", "segm_AP75", "bbox_AP50", "bbox_AP", "segm_AR"):
        assert metrics[key] == pytest.approx(1.0), key
    for k in range(1, 5):
        assert metrics[f"segm_AP50_class{k}"] == pytest.approx(1.0)
    assert sorted(metrics) == sorted(metric_names())  # the names train.metric is checked against


def test_more_than_100_detections_per_image_all_count():
    truth = truth_from_masks(7, grid_masks(300, 200, 200), np.full(300, 2))
    metrics = coco_metrics([truth], {7: perfect(truth)})
    assert metrics["segm_AP50"] == pytest.approx(1.0)
    assert metrics["segm_AP"] == pytest.approx(1.0)
    capped = coco_metrics([truth], {7: perfect(truth)}, max_dets=100)
    assert capped["segm_AP50"] < 0.5


def test_missed_class_lowers_its_ap(truths):
    predictions = {}
    for truth in truths:
        p = perfect(truth)
        keep = p.labels != 3
        predictions[truth.image_id] = ImagePrediction(
            p.boxes[keep], p.labels[keep], p.scores[keep], [r for r, k in zip(p.rles, keep) if k]
        )
    metrics = coco_metrics(truths, predictions)
    assert metrics["segm_AP50_class3"] == 0.0
    assert metrics["segm_AP50_class1"] == pytest.approx(1.0)
    assert metrics["segm_AP50"] == pytest.approx(0.75)


def test_class_without_ground_truth_is_minus_one():
    truth = truth_from_masks(1, grid_masks(2, 20, 20), np.array([1, 1]))
    metrics = coco_metrics([truth], {1: perfect(truth)})
    assert metrics["segm_AP50_class1"] == pytest.approx(1.0)
    assert metrics["segm_AP50_class2"] == -1.0
    assert metrics["segm_AP50"] == pytest.approx(1.0)


def test_no_predictions_scores_zero(truths):
    metrics = coco_metrics(truths, {})
    assert metrics["segm_AP50"] == 0.0 and metrics["bbox_AP"] == 0.0
    assert metrics["segm_AP50_class4"] == 0.0


def test_no_ground_truth_is_undefined():
    empty = ImageTruth(1, 10, 10, np.zeros(0, dtype=np.int64), [])
    assert coco_metrics([empty], {})["segm_AP50"] == -1.0
    assert coco_metrics([], {})["segm_AP"] == -1.0


def test_coco_results_are_json_and_load_with_load_res(truths):
    results = coco_results(1, perfect(truths[0]))
    assert len(results) == 8
    reloaded = json.loads(json.dumps(results))
    entry = reloaded[0]
    assert set(entry) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert entry["segmentation"]["size"] == [40, 50] and isinstance(entry["segmentation"]["counts"], str)
    assert entry["bbox"] == [0.0, 0.0, 8.0, 8.0]
    ground_truth = ground_truth_coco(truths)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = ground_truth.loadRes(reloaded)
    assert len(loaded.getAnnIds(imgIds=[1])) == 8
    load_results(ground_truth, results)
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_id": 99}, "unknown image_id"),
        ({"category_id": 5}, "category_id"),
        ({"segmentation": {"size": [41, 50], "counts": ""}}, "mask size"),
    ],
)
def test_load_results_rejects_bad_entries(truths, change, message):
    results = coco_results(1, perfect(truths[0]))
    results[0].update(change)
    with pytest.raises(ValueError, match=message):
        load_results(ground_truth_coco(truths), results)


def test_score_results_file(tmp_path, truths):
    results = [r for t in truths for r in coco_results(t.image_id, perfect(t))]
    path = tmp_path / "test-results.json"
    path.write_text(json.dumps(results))
    assert score_results_file(path, truths)["segm_AP50"] == pytest.approx(1.0)
    path.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        score_results_file(path, truths)


def test_region_outside_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="leaves the"):
        encode_region(np.ones((3, 3), dtype=bool), 2, 0, (4, 4))
