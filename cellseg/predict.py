"""Memory-safe Mask R-CNN inference: masks are pasted, thresholded and RLE-encoded one at a time.

torchvision's own postprocess pastes every 28x28 mask at full image size at once, an (N, 1, H, W)
float tensor (500 detections on a 2500x735 image is 3.7 GB). Here the model's parts run one by one
and each mask is pasted into its box region and run-length encoded from there, so neither memory
nor time grows with detections times image area.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN

from cellseg.evaluation import ImagePrediction
from cellseg.precision import autocast
from cellseg.rle import encode_region
from cellseg.torchvision_private import expand_boxes, expand_masks, resize_boxes

_PADDING = 1  # torchvision pads the 28x28 masks by one pixel before pasting


@dataclass
class Detections:
    """One image's detections before binarisation: xyxy boxes in the original image's pixels,
    labels, scores, and (N, M, M) mask probabilities relative to each box (M = 28 for Mask R-CNN).

    Mask pixel ``(i, j)`` covers the box's ``i``-th of M rows and ``j``-th of M columns, as in
    RoIAlign, so a detection costs M * M floats whatever the image size.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor
    image_size: tuple[int, int]  # (height, width) of the original image


@torch.inference_mode()
def detect_images(model: MaskRCNN, images: list[torch.Tensor], *, amp: bool = False) -> list[Detections]:
    """The model's detections of (3, H, W) float images in [0, 1], boxes mapped to original size.

    Boxes, labels, scores and masks are those of ``model(images)`` before its masks are pasted at
    full image size, computed under ``train.amp``'s autocast with ``amp`` (returned as float32).
    The model must be in eval mode.
    """
    if model.training:
        raise ValueError("prediction needs the model in eval mode (model.eval())")
    device = next(model.parameters()).device
    images = [image.to(device) for image in images]
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    with autocast(device, amp):
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return [
        Detections(
            boxes=resize_boxes(d["boxes"].float(), resized_size, original_size),
            labels=d["labels"],
            scores=d["scores"].float(),
            masks=d["masks"][:, 0].float(),
            image_size=original_size,
        )
        for d, resized_size, original_size in zip(detections, batch.image_sizes, original_sizes)
    ]


def encode_detections(
    detections: Detections, *, score_threshold: float = 0.0, mask_threshold: float = 0.5
) -> ImagePrediction:
    """Detections scoring at least ``score_threshold``, masks pasted into their boxes as torchvision
    does and binarised at ``mask_threshold`` one at a time, as RLE at original size."""
    keep = detections.scores >= score_threshold
    boxes = detections.boxes[keep]
    return ImagePrediction(
        boxes=boxes.cpu().numpy(),
        labels=detections.labels[keep].cpu().numpy(),
        scores=detections.scores[keep].cpu().numpy(),
        rles=_encode_masks(detections.masks[keep][:, None], boxes, detections.image_size, mask_threshold),
    )


@torch.inference_mode()
def predict_images(
    model: MaskRCNN,
    images: list[torch.Tensor],
    *,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    amp: bool = False,
) -> list[ImagePrediction]:
    """Detections for (3, H, W) float images in [0, 1], with boxes and RLE masks at original size.

    Same boxes, labels, scores and masks as ``model(images)`` thresholded at ``mask_threshold``,
    keeping detections scoring at least ``score_threshold``; the model runs under autocast with
    ``amp`` (``detect_images``). The model must be in eval mode.
    """
    return [
        encode_detections(d, score_threshold=score_threshold, mask_threshold=mask_threshold)
        for d in detect_images(model, images, amp=amp)
    ]


def _encode_masks(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> list[dict]:
    """Paste (N, 1, M, M) mask probabilities into their boxes as torchvision does, one RLE each."""
    height, width = image_size
    masks, scale = expand_masks(masks, padding=_PADDING)
    boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    rles = []
    for mask, (x0, y0, x1, y1) in zip(masks[:, 0], boxes):
        box_w, box_h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        left, right = max(x0, 0), min(x1 + 1, width)
        top, bottom = max(y0, 0), min(y1 + 1, height)
        if left < right and top < bottom:
            resized = F.interpolate(
                mask[None, None], size=(box_h, box_w), mode="bilinear", align_corners=False
            )
            region = (resized[0, 0, top - y0 : bottom - y0, left - x0 : right - x0] > threshold).cpu().numpy()
        else:
            region, top, left = np.zeros((0, 0), dtype=bool), 0, 0
        rles.append(encode_region(region, top, left, image_size))
    return rles
