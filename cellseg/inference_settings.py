"""Inference settings chosen after training, and the one pipeline that applies them.

A model predicts at *cache settings* (loose: score threshold ~0, loose NMS, many detections; at a
test scale and on the image plus its flipped views); ``apply_settings`` then turns those passes
into the final detections: flipped passes merged (``cellseg.tta``), score threshold, NMS
(class-wise or class-agnostic), detections per image, and masks binarised at the mask threshold.
The inference search (``cellseg.prediction_cache``) runs the second half on cached passes, and
export runs both halves on the test images, so what was tuned is what is shipped.

**Post-hoc NMS against the model's own.** torchvision keeps class-specific boxes scoring above
its threshold, runs greedy NMS per class, then keeps the top ``detections_per_img``. A greedy
keep decision depends only on higher-scoring boxes, so on a cache made without suppression
(``nms_iou`` 1) post-hoc class-wise NMS at any IoU equals the model's own at that IoU for every
detection scoring above the cache's lowest; at the cache's own IoU it changes nothing either.
Between the two, it is NMS applied to an already-suppressed set: where box a suppressed b at the
cache's IoU and a is itself suppressed at the lower IoU by a box c that does not overlap b, the
model's own NMS would keep b and the cache no longer holds it. Class-agnostic NMS is an option
the model does not have. Because export applies the same steps to the same cache settings, the
validation AP50 the search reports is that of the exported pipeline either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.ops import batched_nms, nms

from cellseg.atomic_file import write_atomic
from cellseg.config import ModelConfig
from cellseg.errors import DataError
from cellseg.evaluation import ImagePrediction
from cellseg.predict import Detections, encode_detections
from cellseg.tta import DEFAULT_IOU_THRESHOLD, augmented_passes, check_flips, merge_detections, model_detector

SETTINGS_FILE = "inference.json"  # beside best.pt: in a run's checkpoint/ artifacts, in a run directory
IDENTITY = "none"  # the view name of the image itself


@dataclass(frozen=True)
class CacheSettings:
    """How loosely the model predicts the passes that settings are applied to."""

    score_threshold: float = 0.0  # torchvision keeps scores above it: 0 keeps every detection
    nms_iou: float = 0.7  # loose class-wise NMS: near-duplicates would crowd the cache out
    detections: int = 1000  # per pass and image: twice the default model's 500


@dataclass(frozen=True)
class InferenceSettings:
    """Everything between a trained model and its submission."""

    scale: float = 1.0  # test size as a multiple of the trained model.min_size / max_size
    flips: tuple[str, ...] = ()  # test-time flipped views merged with the image (cellseg.tta)
    merge_iou: float = DEFAULT_IOU_THRESHOLD  # box IoU at which passes' detections are one
    score_threshold: float = 0.0  # keep detections scoring above it
    nms_iou: float = 0.5  # suppress a detection overlapping a better one by more than this
    class_agnostic: bool = False  # NMS across classes (the model's own is per class)
    detections: int = 500  # per image, best first
    mask_threshold: float = 0.5  # mask probability at which a pixel belongs to the instance
    cache: CacheSettings = CacheSettings()

    def describe(self) -> str:
        flips = ",".join(self.flips) or IDENTITY
        merge = f" merge_iou={self.merge_iou:.3g}" if self.flips else ""
        nms = "class-agnostic" if self.class_agnostic else "class-wise"
        return (
            f"scale={self.scale:g} flips={flips}{merge} score>{self.score_threshold:.3g} "
            f"nms={self.nms_iou:.3g} ({nms}) detections={self.detections} "
            f"mask>{self.mask_threshold:.3g}"
        )

    def params(self) -> dict[str, Any]:
        """Flat ``key: value`` pairs (MLflow params, the settings file's ``settings``)."""
        values = dataclasses.asdict(self)
        cache = values.pop("cache")
        values["flips"] = ",".join(self.flips) or IDENTITY
        return {**values, **{f"cache_{k}": v for k, v in cache.items()}}


def model_settings(model_cfg: ModelConfig, cache: CacheSettings) -> InferenceSettings:
    """The settings a model predicts with as trained (no flips, its own threshold, NMS and cap),
    within what ``cache`` holds (its NMS IoU and detections at most the cache's)."""
    return InferenceSettings(
        score_threshold=model_cfg.box_score_thresh,
        nms_iou=min(model_cfg.box_nms_thresh, cache.nms_iou),
        detections=min(model_cfg.detections_per_img, cache.detections),
        cache=cache,
    )


@contextlib.contextmanager
def predicting_loosely(model: MaskRCNN, cache: CacheSettings, scale: float) -> Iterator[MaskRCNN]:
    """``model`` predicting at ``cache`` settings with its input size times ``scale``; restored after."""
    heads, transform = model.roi_heads, model.transform
    saved = (
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
        transform.min_size,
        transform.max_size,
    )
    heads.score_thresh, heads.nms_thresh = cache.score_threshold, cache.nms_iou
    heads.detections_per_img = cache.detections
    transform.min_size = tuple(round(size * scale) for size in transform.min_size)
    transform.max_size = round(transform.max_size * scale)
    try:
        yield model
    finally:
        (
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            transform.min_size,
            transform.max_size,
        ) = saved


def view_passes(model: MaskRCNN, image: torch.Tensor, settings: InferenceSettings) -> list[Detections]:
    """The model's passes over ``image`` and its flipped views at the settings' scale and cache
    settings, in the image's frame."""
    with predicting_loosely(model, settings.cache, settings.scale):
        return augmented_passes(model_detector(model), image, check_flips(settings.flips))


def apply_settings(passes: list[Detections], settings: InferenceSettings) -> Detections:
    """The final detections of one image from its loose passes (several are merged first)."""
    merged = passes[0] if len(passes) == 1 else merge_detections(passes, iou_threshold=settings.merge_iou)
    keep = torch.nonzero(merged.scores > settings.score_threshold)[:, 0]
    boxes, scores, labels = merged.boxes[keep].float(), merged.scores[keep], merged.labels[keep]
    if settings.class_agnostic:
        order = nms(boxes, scores, settings.nms_iou)
    else:
        order = batched_nms(boxes, scores, labels, settings.nms_iou)
    keep = keep[order[: settings.detections]]
    return Detections(
        boxes=merged.boxes[keep].float(),
        labels=merged.labels[keep],
        scores=merged.scores[keep].float(),
        masks=merged.masks[keep].float(),
        image_size=merged.image_size,
    )


def predict_with_settings(
    model: MaskRCNN, image: torch.Tensor, settings: InferenceSettings
) -> ImagePrediction:
    """One image predicted by ``model`` under ``settings``: passes, merge, filters, RLE masks."""
    detections = apply_settings(view_passes(model, image, settings), settings)
    return encode_detections(detections, mask_threshold=settings.mask_threshold)


def write_settings(path: Path, settings: InferenceSettings, provenance: Mapping[str, Any]) -> Path:
    """The settings file (JSON): ``settings`` as flat params plus where they came from."""
    payload = {"settings": settings.params(), **provenance}
    return write_atomic(Path(path), lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode("utf-8")))


def read_settings(path: Path) -> InferenceSettings:
    """The settings of a file ``write_settings`` wrote; DataError naming the file otherwise."""
    try:
        params = dict(json.loads(Path(path).read_text())["settings"])
        cache = CacheSettings(
            **{f.name: params.pop(f"cache_{f.name}") for f in dataclasses.fields(CacheSettings)}
        )
        flips = params.pop("flips")
        return InferenceSettings(
            **params, flips=check_flips(() if flips == IDENTITY else flips.split(",")), cache=cache
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: not a readable inference settings file ({exc!r}); run cellseg tune-inference "
            "again, or export with --no-tuned-settings"
        ) from exc
