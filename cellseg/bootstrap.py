"""How far a validation AP50 can be trusted: a bootstrap over validation images.

COCO's matching of detections to ground truth is per image, so it is computed once (pycocotools'
``evaluateImg``) and kept as a :class:`MatchTable`; AP50 of any multiset of the images is then a
weighted cumulative sum over detections sorted by score once, the same arithmetic as COCOeval's
``accumulate`` (an image drawn twice counts its detections and its ground truth twice). With each
image counted once the value is COCOeval's AP50 exactly; a thousand resamples take about a second.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.cocoeval import COCOeval

from cellseg.evaluation import (
    UNDEFINED,
    ImagePrediction,
    ImageTruth,
    coco_results,
    ground_truth_coco,
    load_results,
)
from cellseg.task import NUM_CLASSES

IOU_THRESHOLD = 0.5
RESAMPLES = 1000
LEVEL = 0.95
SEED = 0  # the same seed draws the same resamples for every model evaluated on the same images


@dataclass(frozen=True)
class ClassMatches:
    """One class's detections over all images, sorted by descending score (stable, as COCOeval)."""

    image: np.ndarray  # (D,) index of each detection's image
    matched: np.ndarray  # (D,) bool: matched a ground-truth instance at the IoU threshold
    counted: np.ndarray  # (D,) bool: not ignored (COCOeval's dtIgnore is False)
    truths: np.ndarray  # (I,) ground-truth instances of this class per image, not ignored


@dataclass(frozen=True)
class MatchTable:
    """Per-image matching of one model's detections on a set of images, at one IoU threshold."""

    image_ids: tuple[int, ...]
    classes: tuple[ClassMatches, ...]
    recall_thresholds: np.ndarray  # COCOeval's 101 recall points


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval of AP50 and the resampled values it came from."""

    value: float  # AP50 of the full sample (each image once)
    low: float
    high: float
    level: float
    image_names: tuple[str, ...]  # the images resampled, by name: the same names, the same draws
    samples: np.ndarray  # AP50 of each resample (UNDEFINED without ground truth); see SEED

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def images(self) -> int:
        return len(self.image_names)


def match_images(
    truths: list[ImageTruth],
    results: list[dict],
    *,
    iou_type: str = "segm",
    iou_threshold: float = IOU_THRESHOLD,
    max_dets: int = 1000,
    num_classes: int = NUM_CLASSES,
) -> MatchTable:
    """COCOeval's per-image matching of COCO ``results`` against ``truths`` (all areas, up to
    ``max_dets`` detections per image), once, as a table to resample."""
    ground_truth = ground_truth_coco(truths, num_classes=num_classes)
    evaluator = COCOeval(ground_truth, load_results(ground_truth, results), iouType=iou_type)
    params = evaluator.params
    params.iouThrs = np.array([iou_threshold])
    params.maxDets = [max_dets]
    params.areaRng, params.areaRngLbl = [params.areaRng[0]], ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    image_ids = tuple(int(i) for i in params.imgIds)
    per_image = len(image_ids)
    classes = []
    for k in range(len(params.catIds)):
        scores, image, matched, counted = [], [], [], []
        truths_per_image = np.zeros(per_image, dtype=np.int64)
        for i, found in enumerate(evaluator.evalImgs[k * per_image : (k + 1) * per_image]):
            if found is None:
                continue
            n = len(found["dtScores"][:max_dets])
            scores.append(np.asarray(found["dtScores"][:max_dets], dtype=float))
            image.append(np.full(n, i))
            matched.append(found["dtMatches"][0, :max_dets] > 0)
            counted.append(~found["dtIgnore"][0, :max_dets].astype(bool))
            truths_per_image[i] = np.count_nonzero(np.asarray(found["gtIgnore"]) == 0)
        order = np.argsort(-np.concatenate(scores or [np.zeros(0)]), kind="mergesort")
        classes.append(
            ClassMatches(
                image=np.concatenate(image or [np.zeros(0, dtype=int)])[order],
                matched=np.concatenate(matched or [np.zeros(0, dtype=bool)])[order],
                counted=np.concatenate(counted or [np.zeros(0, dtype=bool)])[order],
                truths=truths_per_image,
            )
        )
    return MatchTable(image_ids, tuple(classes), np.asarray(params.recThrs))


def _class_ap(matches: ClassMatches, weights: np.ndarray, recall_thresholds: np.ndarray) -> float | None:
    """COCOeval's interpolated AP of one class with image ``i`` counted ``weights[i]`` times; None
    when the weighted images hold no ground truth of the class."""
    positives = float(matches.truths @ weights)
    if positives == 0:
        return None
    w = weights[matches.image]
    keep = (w > 0) & matches.counted
    w, matched = w[keep], matches.matched[keep]
    tp = np.cumsum(w * matched)
    fp = np.cumsum(w * ~matched)
    recall = tp / positives
    precision = tp / (tp + fp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.searchsorted(recall, recall_thresholds, side="left")
    valid = points < len(envelope)
    return float(envelope[points[valid]].sum() / len(recall_thresholds))


def average_precision(table: MatchTable, weights: np.ndarray | None = None) -> float:
    """AP of the table's images, image ``i`` counted ``weights[i]`` times (default once each):
    the mean over classes with ground truth; UNDEFINED (-1) when no class has any."""
    weights = np.ones(len(table.image_ids)) if weights is None else np.asarray(weights, dtype=float)
    values = [_class_ap(c, weights, table.recall_thresholds) for c in table.classes]
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else UNDEFINED


def bootstrap_interval(
    table: MatchTable,
    names: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """Percentile interval of AP over ``resamples`` draws of the images with replacement.

    ``names`` names the table's images in order (the validation items' ids; COCO's image ids are
    positions, alike for any two splits of one size). Draws without any ground truth (possible
    with very few images) are left out. The draws depend only on ``seed`` and the number of
    images, so two models scored on the same named images with the same seed see the same
    resamples (their ``samples`` can be compared pairwise).
    """
    if not table.image_ids:
        raise ValueError("no validation images to resample")
    if len(names) != len(table.image_ids):
        raise ValueError(f"{len(names)} names for {len(table.image_ids)} images")
    rng = np.random.default_rng(seed)
    n = len(table.image_ids)
    draws = rng.integers(0, n, size=(resamples, n))
    samples = np.array([average_precision(table, np.bincount(d, minlength=n)) for d in draws])
    defined = samples[samples != UNDEFINED]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail]) if defined.size else (UNDEFINED, UNDEFINED)
    return Interval(average_precision(table), float(low), float(high), level, tuple(names), samples)


def prediction_interval(
    truths: list[ImageTruth],
    predictions: dict[int, ImagePrediction],
    names: Sequence[str],
    *,
    max_dets: int,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval:
    """The bootstrap interval of segm AP50 of ``predictions`` keyed by image id; ``names``: the
    images' names in image id order (see :func:`bootstrap_interval`)."""
    results = [entry for image_id, p in predictions.items() for entry in coco_results(image_id, p)]
    table = match_images(truths, results, max_dets=max_dets)
    return bootstrap_interval(table, names, resamples=resamples, level=level, seed=seed)
