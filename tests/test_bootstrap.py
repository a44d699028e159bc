"""The bootstrap of AP50 over validation images agrees with pycocotools on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.bootstrap import average_precision, bootstrap_interval, match_images
from cellseg.evaluation import ImagePrediction, ImageTruth, coco_results, evaluate_results, truth_from_masks
from cellseg.rle import encode_mask


def squares(rng: np.random.Generator, count: int, size: int = 64, cell: int = 8) -> np.ndarray:
    """``count`` disjoint squares on a grid of a ``size`` x ``size`` image."""
    per_row = size // (cell + 4)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for i in range(count):
        y, x = divmod(i, per_row)
        masks[
            i, y * (cell + 4) + 2 : y * (cell + 4) + 2 + cell, x * (cell + 4) + 2 : x * (cell + 4) + 2 + cell
        ] = 1
    return masks


def noisy_set(seed: int, images: int = 7) -> tuple[list[ImageTruth], list[dict]]:
    """Truths with 0-12 instances of random classes, and predictions that shift them by 0-4 px (IoU
    from 1 to below 0.5), mislabel some, miss some and add false positives, with distinct scores."""
    rng = np.random.default_rng(seed)
    truths, results = [], []
    for image_id in range(10, 10 + images):
        count = int(rng.integers(0, 13))
        masks = squares(rng, count)
        labels = rng.integers(1, 5, count)
        truths.append(truth_from_masks(image_id, masks, labels))
        predicted = []
        for mask, label in zip(masks, labels):
            if rng.random() < 0.8:
                shift = int(rng.integers(0, 5))
                wrong = rng.random() < 0.1
                predicted.append(
                    (np.roll(mask, shift, axis=1), int(rng.integers(1, 5)) if wrong else int(label))
                )
        for _ in range(int(rng.integers(0, 4))):
            fp = np.zeros((64, 64), dtype=np.uint8)
            y, x = rng.integers(0, 56, 2)
            fp[y : y + 8, x : x + 8] = 1
            predicted.append((fp, int(rng.integers(1, 5))))
        rles = [encode_mask(m) for m, _ in predicted]
        boxes = np.array([mask_utils.toBbox(r) for r in rles]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        prediction = ImagePrediction(
            boxes, np.array([lab for _, lab in predicted]), rng.random(len(predicted)), rles
        )
        results += coco_results(image_id, prediction)
    return truths, results


@pytest.mark.parametrize(("seed", "iou_type"), [(0, "segm"), (1, "segm"), (2, "bbox")])
def test_the_full_sample_is_pycocotools_ap50(seed, iou_type):
    truths, results = noisy_set(seed)
    expected = evaluate_results(truths, results)[f"{iou_type}_AP50"]
    table = match_images(truths, results, iou_type=iou_type)
    assert 0.2 < expected < 0.95  # neither trivial nor empty
    assert average_precision(table) == pytest.approx(expected, abs=1e-12)


def test_a_weighted_sample_is_pycocotools_ap50_of_the_images_repeated():
    """Image i counted w[i] times is COCOeval on a dataset holding w[i] copies of image i."""
    truths, results = noisy_set(3)
    weights = np.array([2, 0, 1, 3, 0, 1, 1])
    copies, copied_results = [], []
    for truth, count in zip(truths, weights):
        for c in range(count):
            new_id = truth.image_id * 10 + c
            copies.append(ImageTruth(new_id, truth.height, truth.width, truth.labels, truth.rles))
            copied_results += [{**r, "image_id": new_id} for r in results if r["image_id"] == truth.image_id]
    expected = evaluate_results(copies, copied_results)["segm_AP50"]
    assert average_precision(match_images(truths, results), weights) == pytest.approx(expected, abs=1e-12)


def test_the_interval_holds_the_value_is_repeatable_and_collapses_for_perfect_predictions():
    truths, results = noisy_set(4, images=12)
    table = match_images(truths, results)
    names = [f"img{i}" for i in range(12)]
    interval = bootstrap_interval(table, names, resamples=300, seed=5)
    assert interval.low < interval.value < interval.high and interval.width > 0.02
    assert interval.images == 12 and interval.samples.shape == (300,)
    assert interval.image_names == tuple(names)
    with pytest.raises(ValueError, match="11 names for 12 images"):
        bootstrap_interval(table, names[:11])
    again = bootstrap_interval(table, names, resamples=300, seed=5)
    assert (again.low, again.high) == (interval.low, interval.high)
    assert bootstrap_interval(table, names, resamples=300, seed=6).low != interval.low
    narrow = bootstrap_interval(table, names, resamples=300, level=0.5, seed=5)
    assert interval.low < narrow.low <= narrow.high < interval.high

    perfect = [entry for t in truths for entry in coco_results(t.image_id, _as_prediction(t))]
    exact = bootstrap_interval(match_images(truths, perfect), names, resamples=50)
    assert (exact.value, exact.low, exact.high) == (1.0, 1.0, 1.0)


def _as_prediction(truth: ImageTruth) -> ImagePrediction:
    boxes = np.array([mask_utils.toBbox(r) for r in truth.rles]).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return ImagePrediction(boxes, truth.labels, np.linspace(1, 0.5, len(truth.rles)), list(truth.rles))
