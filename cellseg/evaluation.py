"""COCO evaluation of instance masks and boxes on plain numpy arrays and result dicts.

Metrics follow COCOeval with ``maxDets = [1, 10, max_dets]`` so that every detection counts (COCO's
default of 100 per image throws recall away on images with 500 cells). A metric that is undefined
because the evaluated set has no ground truth (for the whole set, or for one class) is -1.0, as in
COCO's own summaries; with ground truth but no predictions every AP is 0.0.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.errors import DataError
from cellseg.rle import counts_str, encode_mask
from cellseg.task import IOU_TYPES, NUM_CLASSES, SUMMARIES

UNDEFINED = -1.0  # COCO's value for a metric without ground truth


@dataclass
class ImageTruth:
    """Ground-truth instances of one image: labels 1..4 and one compressed RLE per instance."""

    image_id: int
    height: int
    width: int
    labels: np.ndarray
    rles: list[dict]


@dataclass
class ImagePrediction:
    """Predicted instances of one image: xyxy boxes, labels 1..4, scores and RLE masks."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    rles: list[dict]


def truth_from_masks(image_id: int, masks: np.ndarray, labels: np.ndarray) -> ImageTruth:
    """Ground truth of one image from (N, H, W) binary masks and (N,) labels."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != len(labels):
        raise ValueError(f"expected (N, H, W) masks and N labels, got {masks.shape} and {len(labels)}")
    height, width = masks.shape[1:]
    return ImageTruth(
        image_id=int(image_id),
        height=int(height),
        width=int(width),
        labels=np.asarray(labels, dtype=np.int64),
        rles=[encode_mask(m) for m in masks],
    )


def coco_results(image_id: int, prediction: ImagePrediction) -> list[dict]:
    """COCO result entries (JSON-serialisable) for one image's predictions."""
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "score": float(score),
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": counts_str(rle)},
        }
        for (x0, y0, x1, y1), label, score, rle in zip(
            prediction.boxes.tolist(), prediction.labels, prediction.scores, prediction.rles
        )
    ]


def ground_truth_coco(truths: list[ImageTruth], *, num_classes: int = NUM_CLASSES) -> COCO:
    """An in-memory COCO ground-truth object (categories 1..num_classes)."""
    images, annotations = [], []
    for truth in truths:
        images.append({"id": truth.image_id, "height": truth.height, "width": truth.width})
        for label, rle in zip(truth.labels, truth.rles):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": truth.image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k, "name": f"class{k}"} for k in range(1, num_classes + 1)]
    return _coco({"images": images, "annotations": annotations, "categories": categories})


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_results(ground_truth: COCO, results: list[dict]) -> COCO:
    """Check results against the ground truth's images and categories and load them with loadRes.

    Raises DataError for an unknown image or category id or a mask whose size differs from its
    image. An empty list (which loadRes rejects) gives a result object without annotations.
    """
    category_ids = set(ground_truth.getCatIds())
    for i, result in enumerate(results):
        image = ground_truth.imgs.get(result["image_id"])
        if image is None:
            raise DataError(f"result {i}: unknown image_id {result['image_id']!r}")
        if result["category_id"] not in category_ids:
            raise DataError(
                f"result {i}: category_id {result['category_id']!r} not in {sorted(category_ids)}"
            )
        size = list(result["segmentation"]["size"])
        if size != [image["height"], image["width"]]:
            raise DataError(
                f"result {i}: mask size {size} differs from image {result['image_id']} "
                f"of size {[image['height'], image['width']]}"
            )
    if not results:
        dataset = {"images": ground_truth.dataset["images"], "categories": ground_truth.dataset["categories"]}
        return _coco({**dataset, "annotations": []})
    with contextlib.redirect_stdout(io.StringIO()):
        return ground_truth.loadRes([dict(r) for r in results])  # loadRes adds keys in place


def evaluate_results(
    truths: list[ImageTruth],
    results: list[dict],
    *,
    num_classes: int = NUM_CLASSES,
    max_dets: int = 1000,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """Segm and bbox AP, AP50, AP75 and AR (all areas, ``max_dets`` per image) and per-class segm AP50:
    the keys of ``cellseg.task.metric_names(num_classes)`` (only those of ``iou_types`` if given).

    AP values are averaged from COCOeval's precision array rather than taken from ``summarize``,
    whose overall AP is hard-wired to 100 detections per image.
    """
    ground_truth = ground_truth_coco(truths, num_classes=num_classes)
    detections = load_results(ground_truth, results)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        evaluator = COCOeval(ground_truth, detections, iouType=iou_type)
        evaluator.params.maxDets = [1, 10, max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        iou_thresholds = evaluator.params.iouThrs
        # precision: [IoU threshold, recall threshold, class, area range, max dets]; recall without R
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        recall = evaluator.eval["recall"][:, :, 0, -1]
        at50 = precision[np.isclose(iou_thresholds, 0.5)][0]
        summaries = {
            "AP": _mean_defined(precision),
            "AP50": _mean_defined(at50),
            "AP75": _mean_defined(precision[np.isclose(iou_thresholds, 0.75)][0]),
            "AR": _mean_defined(recall),
        }
        metrics.update({f"{iou_type}_{name}": summaries[name] for name in SUMMARIES})
        if iou_type == "segm":
            for k, category_id in enumerate(evaluator.params.catIds):
                metrics[f"segm_AP50_class{category_id}"] = _mean_defined(at50[:, k])
    return metrics


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else UNDEFINED


def coco_max_dets(detections_per_img: int) -> int:
    """COCOeval's largest ``maxDets`` for a model that keeps ``detections_per_img`` (at least 100)."""
    return max(detections_per_img, 100)


def coco_metrics(
    truths: list[ImageTruth],
    predictions: dict[int, ImagePrediction],
    *,
    num_classes: int = NUM_CLASSES,
    max_dets: int = 1000,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """COCO metrics of predictions keyed by image id (see ``evaluate_results`` for the keys)."""
    results = [entry for image_id, p in predictions.items() for entry in coco_results(image_id, p)]
    return evaluate_results(truths, results, num_classes=num_classes, max_dets=max_dets, iou_types=iou_types)


def score_results_file(
    results_json: Path, truths: list[ImageTruth], *, num_classes: int = NUM_CLASSES, max_dets: int = 1000
) -> dict[str, float]:
    """Score a written test-results.json against ground truth."""
    try:
        results: Any = json.loads(Path(results_json).read_text())
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8 or not JSON
        raise DataError(f"{results_json}: not a readable JSON results file ({exc})") from exc
    if not isinstance(results, list):
        raise DataError(f"{results_json}: expected a JSON list of results, got {type(results).__name__}")
    return evaluate_results(truths, results, num_classes=num_classes, max_dets=max_dets)
