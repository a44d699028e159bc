"""Shrinking a training sample to the model's input size before its instance masks are made.

torchvision's transform resizes every binary instance mask as float (N x H x W x 4 bytes): for a
crowded 1000 px image going into a 256 px model that is over a gigabyte and most of a step's data
time. Shrinking the image and the four label maps first, with the transform's own scale, leaves
the transform nothing to do (its scale is then 1) and makes the masks at the small size; the
shared rule is stated in ``cellseg.input_scale``.
"""

from __future__ import annotations

import numpy as np
import torch

from cellseg.input_scale import model_scale, resize_image


def downscale_sample(
    image: np.ndarray, label_maps: np.ndarray, min_size: int, max_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) bilinear and ``label_maps`` (C, H, W) nearest, as the transform would
    resize them, when that scale is below 1; unchanged otherwise."""
    height, width = image.shape[:2]
    scale = model_scale(height, width, min_size, max_size)
    if scale >= 1.0:
        return image, label_maps
    resized = resize_image(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), scale)
    out_h, out_w = resized.shape[-2:]
    rows = np.minimum(np.floor(np.arange(out_h) * (height / out_h)).astype(np.int64), height - 1)
    cols = np.minimum(np.floor(np.arange(out_w) * (width / out_w)).astype(np.int64), width - 1)
    return (
        np.ascontiguousarray(resized.numpy().transpose(1, 2, 0)),
        np.ascontiguousarray(label_maps[:, rows[:, None], cols[None, :]]),
    )
