"""Inference settings chosen after training, and the one pipeline that applies them.

One or more models (an ensemble, best first) predict at *cache settings* (loose: score threshold
~0, loose NMS, many detections), each at one or more test scales and on the image plus its
flipped views; ``apply_settings`` then turns those passes into the final detections: passes
merged (``cellseg.tta``: every pass of every model, scale and view weighs the same), score
threshold, NMS
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
from collections.abc import Iterator, Mapping, Sequence
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
SCALE_JOIN = "+"  # merged test scales as one label: "1+1.25"


def settings_file_name(members: int) -> str:
    """The settings file of one model (``inference.json``) or of the ``members`` best runs'
    ensemble (``inference-ensemble<K>.json``), beside the best run's checkpoint."""
    return SETTINGS_FILE if members == 1 else f"inference-ensemble{members}.json"


def scales_label(scales: Sequence[float]) -> str:
    """``(1.0, 1.25)`` as ``"1+1.25"`` (a search's categorical value, an MLflow param)."""
    return SCALE_JOIN.join(f"{s:g}" for s in scales)


def parse_scales(label: str) -> tuple[float, ...]:
    """The scales of a ``scales_label``."""
    return tuple(float(s) for s in label.split(SCALE_JOIN))


@dataclass(frozen=True)
class CacheSettings:
    """How loosely the model predicts the passes that settings are applied to."""

    score_threshold: float = 0.0  # torchvision keeps scores above it: 0 keeps every detection
    nms_iou: float = 0.7  # loose class-wise NMS: near-duplicates would crowd the cache out
    detections: int = 1000  # per pass and image: twice the default model's 500


@dataclass(frozen=True)
class InferenceSettings:
    """Everything between a trained model and its submission."""

    scales: tuple[float, ...] = (1.0,)  # test sizes, multiples of the trained min/max_size; merged
    flips: tuple[str, ...] = ()  # test-time flipped views merged with the image (cellseg.tta)
    models: int = 1  # ensemble members merged, the best runs first (the settings file names them)
    merge_iou: float = DEFAULT_IOU_THRESHOLD  # box IoU at which passes' detections are one
    score_threshold: float = 0.0  # keep detections scoring above it
    nms_iou: float = 0.5  # suppress a detection overlapping a better one by more than this
    class_agnostic: bool = False  # NMS across classes (the model's own is per class)
    detections: int = 500  # per image, best first
    mask_threshold: float = 0.5  # mask probability at which a pixel belongs to the instance
    cache: CacheSettings = CacheSettings()

    @property
    def passes(self) -> int:
        """Passes merged per image: models x scales x views (the image and each flip)."""
        return self.models * len(self.scales) * (1 + len(self.flips))

    def describe(self) -> str:
        flips = ",".join(self.flips) or IDENTITY
        models = f" models={self.models}" if self.models > 1 else ""
        merge = f" merge_iou={self.merge_iou:.3g}" if self.passes > 1 else ""
        nms = "class-agnostic" if self.class_agnostic else "class-wise"
        return (
            f"scales={scales_label(self.scales)}{models} flips={flips}{merge} "
            f"score>{self.score_threshold:.3g} "
            f"nms={self.nms_iou:.3g} ({nms}) detections={self.detections} "
            f"mask>{self.mask_threshold:.3g}"
        )

    def params(self) -> dict[str, Any]:
        """Flat ``key: value`` pairs (MLflow params, the settings file's ``settings``)."""
        values = dataclasses.asdict(self)
        cache = values.pop("cache")
        values["flips"] = ",".join(self.flips) or IDENTITY
        values["scales"] = scales_label(self.scales)
        return {**values, **{f"cache_{k}": v for k, v in cache.items()}}


def model_settings(model_cfg: ModelConfig, cache: CacheSettings) -> InferenceSettings:
    """The settings a model predicts with as trained (no flips, its own threshold, NMS and cap)."""
    return InferenceSettings(
        score_threshold=model_cfg.box_score_thresh,
        nms_iou=model_cfg.box_nms_thresh,
        detections=model_cfg.detections_per_img,
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


def view_passes(
    model: MaskRCNN, image: torch.Tensor, cache: CacheSettings, scale: float, flips: Sequence[str]
) -> list[Detections]:
    """The model's passes over ``image`` and its ``flips`` views at ``scale`` and ``cache``
    settings, in the image's frame."""
    with predicting_loosely(model, cache, scale):
        return augmented_passes(model_detector(model), image, check_flips(flips))


def settings_passes(
    models: Sequence[MaskRCNN], image: torch.Tensor, settings: InferenceSettings
) -> list[Detections]:
    """The passes ``settings`` merge, in the prediction cache's order: each of the first
    ``settings.models`` models, at each of its scales, on the image and each flip."""
    if len(models) < settings.models:
        raise ValueError(f"the settings merge {settings.models} models; {len(models)} given")
    return [
        detections
        for model in models[: settings.models]
        for scale in settings.scales
        for detections in view_passes(model, image, settings.cache, scale, settings.flips)
    ]


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
    models: Sequence[MaskRCNN], image: torch.Tensor, settings: InferenceSettings
) -> ImagePrediction:
    """One image predicted by ``models`` (an ensemble's, best first; the first ``settings.models``
    predict) under ``settings``: passes, merge, filters, RLE masks."""
    detections = apply_settings(settings_passes(models, image, settings), settings)
    return encode_detections(detections, mask_threshold=settings.mask_threshold)


def write_settings(path: Path, settings: InferenceSettings, provenance: Mapping[str, Any]) -> Path:
    """The settings file (JSON): ``settings`` as flat params plus where they came from."""
    payload = {"settings": settings.params(), **provenance}
    return write_atomic(Path(path), lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode("utf-8")))


def read_settings(path: Path) -> InferenceSettings:
    """The settings of a file ``write_settings`` wrote (also of one written before ensembles and
    merged scales: its single ``scale``); DataError naming the file otherwise."""
    try:
        params = dict(_read(path)["settings"])
        cache = CacheSettings(
            **{f.name: params.pop(f"cache_{f.name}") for f in dataclasses.fields(CacheSettings)}
        )
        flips = params.pop("flips")
        scales = (float(params.pop("scale")),) if "scale" in params else parse_scales(params.pop("scales"))
        return InferenceSettings(
            **params,
            scales=scales,
            flips=check_flips(() if flips == IDENTITY else flips.split(",")),
            cache=cache,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unreadable(path, exc) from exc


def read_members(path: Path) -> list[str]:
    """The run ids whose models a settings file was tuned for, best first (a file written before
    ensembles names its one run as ``tuned_run``; empty when it names none); DataError naming the
    file when it is unreadable."""
    try:
        payload = _read(path)
        runs = payload.get("members") or ([payload["tuned_run"]] if "tuned_run" in payload else [])
        return [str(run) for run in runs]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unreadable(path, exc) from exc


def _read(path: Path) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"{path}: not a readable inference settings file ({exc!r}); run cellseg tune-inference "
        "again, or export with --no-tuned-settings"
    )
