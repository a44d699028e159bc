"""The validation split predicted once per model, test scale and view, kept in memory within a
bound, so that inference settings can be scored without running the models again.

The models are an ensemble's members, best first (one model without ``--ensemble``). Each pass keeps every detection's box, score and class and its M x M box-relative mask
probabilities (M = 28) as float16, at most ``CacheSettings.detections`` per image. The cache
needs at most ``cache_bound_bytes`` = passes x images x detections x (M * M * 2 + 32) bytes, with
passes = models x scales x views; a request above ``max_bytes`` is refused before any model runs.
Nothing is written to disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.models.detection import MaskRCNN
from tqdm import tqdm

from cellseg.bootstrap import Interval, prediction_interval
from cellseg.errors import ConfigError
from cellseg.evaluation import ImagePrediction, ImageTruth, coco_max_dets, coco_metrics, truth_from_masks
from cellseg.inference_settings import (
    IDENTITY,
    CacheSettings,
    InferenceSettings,
    apply_settings,
    view_passes,
)
from cellseg.predict import Detections, encode_detections
from cellseg.tta import check_flips

log = logging.getLogger(__name__)

DETECTION_BYTES = 32  # a cached detection besides its mask: box (16), score (4), label (8), slack
MASK_BYTES = 2  # float16 mask probabilities
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB: the real slice at 3 scales x 3 views x 1000 detections needs ~0.5


def mask_side(model: MaskRCNN) -> int:
    """M of the model's M x M masks: the mask head doubles its RoIAlign output size."""
    return 2 * model.roi_heads.mask_roi_pool.output_size[0]


def cache_bound_bytes(passes: int, images: int, detections: int, side: int) -> int:
    """The most bytes a cache of ``passes`` (models x scales x views) over ``images`` can hold."""
    return passes * images * detections * (side * side * MASK_BYTES + DETECTION_BYTES)


@dataclass
class PredictionCache:
    """Loose passes of the validation images: ``passes[(model, scale, view)][i]`` is image i's
    (``model``: the member's index, 0 the best)."""

    cache: CacheSettings
    truths: list[ImageTruth]
    passes: dict[tuple[int, float, str], list[Detections]]

    @property
    def nbytes(self) -> int:
        return sum(
            d.boxes.nbytes + d.scores.nbytes + d.labels.nbytes + d.masks.nbytes
            for image_passes in self.passes.values()
            for d in image_passes
        )

    def image_passes(self, settings: InferenceSettings, index: int) -> list[Detections]:
        """Image ``index``'s passes that ``settings`` merge, in ``settings_passes``'s order (its
        first ``models`` models; at its scales; the image and its flips)."""
        keys = [
            (model, scale, view)
            for model in range(settings.models)
            for scale in settings.scales
            for view in (IDENTITY, *settings.flips)
        ]
        missing = [key for key in keys if key not in self.passes]
        if missing:
            raise ConfigError(
                "the cache holds no pass for (model, scale, view) "
                + ", ".join(f"({m}, {s:g}, {v})" for m, s, v in missing)
            )
        return [self.passes[key][index] for key in keys]

    def predictions(self, settings: InferenceSettings) -> dict[int, ImagePrediction]:
        """Every validation image's prediction under ``settings``, by image id."""
        return {
            truth.image_id: encode_detections(
                apply_settings(self.image_passes(settings, i), settings),
                mask_threshold=settings.mask_threshold,
            )
            for i, truth in enumerate(self.truths)
        }

    def ap50(self, settings: InferenceSettings) -> float:
        """Validation segm AP50 of ``settings`` applied to the cached passes (every detection
        counts: COCOeval's cap is the cache's)."""
        metrics = coco_metrics(
            self.truths,
            self.predictions(settings),
            max_dets=coco_max_dets(self.cache.detections),
            iou_types=("segm",),
        )
        return metrics["segm_AP50"]

    def interval(self, settings: InferenceSettings) -> Interval:
        """The bootstrap interval of ``ap50(settings)`` (seed 0: paired with any other settings')."""
        names = [str(truth.image_id) for truth in self.truths]  # one cache: always the same images
        return prediction_interval(
            self.truths, self.predictions(settings), names, max_dets=coco_max_dets(self.cache.detections)
        )


def _compact(detections: Detections) -> Detections:
    """Detections on the CPU with float16 masks."""
    return Detections(
        detections.boxes.cpu(),
        detections.labels.cpu(),
        detections.scores.cpu(),
        detections.masks.to(device="cpu", dtype=torch.float16),
        detections.image_size,
    )


@torch.inference_mode()
def build_cache(
    models: Sequence[MaskRCNN],
    dataset: Sequence[tuple[torch.Tensor, dict]],
    *,
    cache: CacheSettings,
    scales: Sequence[float],
    flips: Sequence[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> PredictionCache:
    """Predict every (image, target) of ``dataset`` once per model (an ensemble's members, best
    first), scale and view (the image and each flip) at ``cache`` settings; ConfigError before
    any prediction when the bound exceeds ``max_bytes``."""
    flips = check_flips(flips)
    views = (IDENTITY, *flips)
    scales = tuple(dict.fromkeys(map(float, scales)))  # a scale given twice is predicted once
    keys = [(model, scale, view) for model in range(len(models)) for scale in scales for view in views]
    side = max(mask_side(model) for model in models)
    bound = cache_bound_bytes(len(keys), len(dataset), cache.detections, side)
    if bound > max_bytes:
        raise ConfigError(
            f"the prediction cache could need {bound / 2**20:.0f} MiB ({len(keys)} passes = "
            f"{len(models)} model(s) x {len(scales)} scale(s) x {len(views)} view(s), x "
            f"{len(dataset)} images x {cache.detections} detections), above the limit of "
            f"{max_bytes / 2**20:.0f} MiB: lower --cache-detections, give fewer --scales, pass "
            "--no-tta, a smaller --ensemble, or raise --max-cache-mb"
        )
    for model in models:
        model.eval()
    passes: dict[tuple[int, float, str], list[Detections]] = {key: [] for key in keys}
    truths = []
    for image, target in tqdm(dataset, desc="cache validation predictions", disable=not progress):
        truths.append(
            truth_from_masks(int(target["image_id"]), target["masks"].numpy(), target["labels"].numpy())
        )
        for index, model in enumerate(models):
            on_device = image.to(next(model.parameters()).device)
            for scale in scales:
                found = view_passes(model, on_device, cache, scale, flips)
                for view, detections in zip(views, found):
                    passes[(index, scale, view)].append(_compact(detections))
    result = PredictionCache(cache, truths, passes)
    log.info("prediction cache: %.1f MiB (bound %.1f MiB)", result.nbytes / 2**20, bound / 2**20)
    return result
