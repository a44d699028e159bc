"""How an image is scaled to the model's input size: the one rule data and model share.

The invariant: the model's transform (``cellseg.model.CellTransform``) scales an (H, W) image by
``model_scale(H, W, size, max_size)`` with ``resize_image``, exactly as torchvision's
``GeneralizedRCNNTransform`` does; the training dataset (``cellseg.data.resize``) shrinks a sample
beforehand with the same two functions, so the transform then finds scale 1 and passes image
and masks through untouched. ``data`` and ``model`` both import this module, never each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The scale GeneralizedRCNNTransform applies: short side to min_size, long side <= max_size."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """A (C, H, W) float image scaled bilinearly by ``scale``, as GeneralizedRCNNTransform does."""
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def resize_masks(masks: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, H, W) uint8 masks scaled by nearest neighbour, as GeneralizedRCNNTransform does."""
    return F.interpolate(masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True)[:, 0].byte()
