"""Test-time augmentation (flips) and ensembles: several passes' detections merged into one set.

A *pass* is one model's detections of one view of an image (the image itself, or the image flipped
``hflip`` left-right, ``vflip`` top-bottom or ``hvflip`` both), mapped back to the original frame.
TTA is several views of one model; an ensemble is several models; both at once is every model on
every view. The passes are merged by one rule:

- **Matching**: all passes' detections are taken highest score first; each one not yet taken
  starts a group, which takes from every other pass the not-yet-taken detection of the same class
  whose box IoU with the group's first detection is highest and at least ``iou_threshold``.
- **Averaging**: the group's score is the sum of its members' divided by all P passes, so **a pass
  without a member counts 0** (a detection that k of P passes found keeps k/P of its mean score:
  kept, ranked lower, never dropped). Its box and mask probabilities are the plain means over its
  k members: a pass that missed the instance says nothing about its shape (divided by P, the mask
  of a detection one pass in three found would never reach 0.5 and vanish). Each member's
  box-relative mask is resampled bilinearly onto the group's box (zero outside its own box) before
  averaging.
- Groups are ranked by merged score and the top ``max_detections`` kept; masks are then pasted and
  binarised at ``mask_threshold`` one at a time, as ``cellseg.predict`` does.

Memory: masks stay in their M x M box-relative form (M = 28) until each is pasted, so merging P
passes of N detections holds P * N * M * M floats (9 passes of 500 detections: 14 MB) plus one
IoU matrix of P * N by N at a time (9 MB); nothing of image size is ever stacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.ops import box_iou

from cellseg.errors import ConfigError
from cellseg.evaluation import ImagePrediction
from cellseg.predict import Detections, detect_images, encode_detections

FLIPS = {"hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}  # view name -> flipped image dims
DEFAULT_TTA = ("hflip", "vflip")  # the views of a bare ``export --tta``
DEFAULT_IOU_THRESHOLD = 0.55  # box IoU at which two passes' detections are the same instance

_SAME_BOX = 1e-3  # pixels: a member's box this close to the merged one needs no resampling

Detector = Callable[[torch.Tensor], Detections]  # a (3, H, W) image -> its detections


def model_detector(model: MaskRCNN) -> Detector:
    """The detections of one image by ``model`` (in eval mode, on the image's device)."""
    return lambda image: detect_images(model, [image])[0]


def check_flips(flips: Sequence[str]) -> tuple[str, ...]:
    """``flips`` as a tuple, or ConfigError naming the unknown view and the known ones."""
    unknown = [f for f in flips if f not in FLIPS]
    if unknown:
        raise ConfigError(f"unknown test-time flip {unknown[0]!r}; use any of {', '.join(FLIPS)}")
    return tuple(flips)


def check_iou_threshold(iou_threshold: float) -> float:
    """``iou_threshold`` when it lies in (0, 1], else ConfigError."""
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"the merge IoU threshold must lie in (0, 1]; got {iou_threshold}")
    return iou_threshold


def unflip(detections: Detections, flip: str) -> Detections:
    """Detections of the ``flip`` view of an image mapped to the image itself (and back: a flip
    is its own inverse)."""
    height, width = detections.image_size
    boxes, masks = detections.boxes.clone(), detections.masks
    for dim in FLIPS[flip]:
        size, (low, high) = (width, (0, 2)) if dim == -1 else (height, (1, 3))
        boxes[:, low], boxes[:, high] = size - detections.boxes[:, high], size - detections.boxes[:, low]
        masks = masks.flip(dim)
    return Detections(boxes, detections.labels, detections.scores, masks, detections.image_size)


@torch.inference_mode()
def augmented_passes(detector: Detector, image: torch.Tensor, flips: Sequence[str]) -> list[Detections]:
    """The detector's pass on ``image`` and on each flipped view, all in ``image``'s frame."""
    passes = [detector(image)]
    for flip in check_flips(flips):
        passes.append(unflip(detector(image.flip(FLIPS[flip])), flip))
    return passes


@torch.inference_mode()
def merge_detections(
    passes: Sequence[Detections],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_detections: int | None = None,
) -> Detections:
    """One set of detections from several passes over one image, by the module's merge rule."""
    if not passes:
        raise ValueError("merge_detections needs at least one pass")
    image_size = passes[0].image_size
    if any(p.image_size != image_size for p in passes):
        raise ValueError(f"passes over different image sizes: {[p.image_size for p in passes]}")
    boxes = torch.cat([p.boxes for p in passes]).float().cpu()
    labels = torch.cat([p.labels for p in passes]).cpu().numpy()
    scores = torch.cat([p.scores for p in passes]).float().cpu()
    masks = torch.cat([p.masks for p in passes]).float().cpu()
    sizes = [len(p.scores) for p in passes]
    starts = np.cumsum([0, *sizes])
    source = np.repeat(np.arange(len(passes)), sizes)
    candidates = _candidates(boxes, labels, starts, iou_threshold)
    taken = np.zeros(len(scores), dtype=bool)
    groups = []
    for seed in torch.argsort(scores, descending=True, stable=True).tolist():
        if taken[seed]:
            continue
        taken[seed] = True
        group = [seed]
        for other, options in candidates.get(seed, {}).items():
            if other == source[seed]:
                continue
            match = next((j for j in options if not taken[j]), None)
            if match is not None:
                taken[match] = True
                group.append(match)
        groups.append(group)
    merged_scores = torch.tensor([float(scores[g].sum()) / len(passes) for g in groups])
    order = torch.argsort(merged_scores, descending=True, stable=True)[:max_detections].tolist()
    groups = [groups[i] for i in order]
    merged_boxes = torch.stack([boxes[g].mean(dim=0) for g in groups]) if groups else boxes[:0]
    merged_masks = (
        torch.stack([_mean_mask(boxes[g], masks[g], box) for g, box in zip(groups, merged_boxes)])
        if groups
        else masks[:0]
    )
    return Detections(
        boxes=merged_boxes,
        labels=torch.as_tensor(labels[[g[0] for g in groups]], dtype=torch.int64),
        scores=merged_scores[order],
        masks=merged_masks,
        image_size=image_size,
    )


def _candidates(
    boxes: torch.Tensor, labels: np.ndarray, starts: np.ndarray, threshold: float
) -> dict[int, dict[int, list[int]]]:
    """For each detection, per pass, the same-class detections at IoU >= threshold, best first.

    One pass's IoU column block is computed at a time (all detections by that pass's).
    """
    found: dict[int, dict[int, list[tuple[float, int]]]] = {}
    for index, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        if start == stop:
            continue
        iou = box_iou(boxes, boxes[start:stop]).numpy()
        iou[labels[:, None] != labels[None, start:stop]] = -1.0
        rows, cols = np.nonzero(iou >= threshold)
        for row, col in zip(rows.tolist(), cols.tolist()):
            found.setdefault(row, {}).setdefault(index, []).append((-float(iou[row, col]), start + col))
    return {
        row: {index: [j for _, j in sorted(options)] for index, options in per_pass.items()}
        for row, per_pass in found.items()
    }


def _mean_mask(boxes: torch.Tensor, masks: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The mean of the members' (K, M, M) box-relative masks resampled onto ``box`` (a member whose
    box is within ``_SAME_BOX`` pixels of ``box`` is taken as it is)."""
    same = (boxes - box).abs().amax(dim=1) <= _SAME_BOX
    total = masks[same].sum(dim=0)
    if not same.all():
        size = masks.shape[-1]
        centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        xs = box[0] + centres * (box[2] - box[0])  # image coordinates of the merged mask's pixels
        ys = box[1] + centres * (box[3] - box[1])
        others = boxes[~same]
        widths = (others[:, 2] - others[:, 0]).clamp(min=1e-6)
        heights = (others[:, 3] - others[:, 1]).clamp(min=1e-6)
        gx = 2 * (xs[None, :] - others[:, 0, None]) / widths[:, None] - 1  # (K, M) in [-1, 1]
        gy = 2 * (ys[None, :] - others[:, 1, None]) / heights[:, None] - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        resampled = F.grid_sample(
            masks[~same][:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        total = total + resampled[:, 0].sum(dim=0)
    return total / len(masks)


def predict_merged(
    detectors: Sequence[Detector],
    image: torch.Tensor,
    *,
    flips: Sequence[str] = (),
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_detections: int | None = None,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
) -> ImagePrediction:
    """Every detector on ``image`` and its ``flips`` views, merged, binarised and RLE-encoded.

    Merged detections scoring below ``score_threshold`` are dropped.
    """
    passes = [p for detector in detectors for p in augmented_passes(detector, image, flips)]
    merged = merge_detections(passes, iou_threshold=iou_threshold, max_detections=max_detections)
    return encode_detections(merged, score_threshold=score_threshold, mask_threshold=mask_threshold)
