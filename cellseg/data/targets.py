"""Per-instance detection targets (boxes, labels, binary masks) from per-class label maps."""

from __future__ import annotations

import numpy as np


def targets_from_label_maps(label_maps: np.ndarray) -> dict[str, np.ndarray]:
    """Boxes float32 (N, 4) xyxy, labels int64 (N,) in 1..C and masks uint8 (N, H, W).

    Instances are the nonzero (class, id) pairs, ordered by class then id; x2 and y2 are one past
    the last column and row. The work is one sort of the labelled pixels, not a pass per instance.
    """
    num_classes, height, width = label_maps.shape
    flat = label_maps.reshape(num_classes, -1)
    cls, pixel = np.nonzero(flat)
    keys = (cls.astype(np.int64) << 32) | flat[cls, pixel].astype(np.int64)
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    n = len(unique_keys)
    masks = np.zeros((n, height * width), np.uint8)
    masks[inverse, pixel] = 1
    boxes = np.zeros((n, 4), np.float32)
    if n:
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
        rows, cols = pixel[order] // width, pixel[order] % width
        boxes[:, 0] = np.minimum.reduceat(cols, starts)
        boxes[:, 1] = np.minimum.reduceat(rows, starts)
        boxes[:, 2] = np.maximum.reduceat(cols, starts) + 1
        boxes[:, 3] = np.maximum.reduceat(rows, starts) + 1
    return {
        "boxes": boxes,
        "labels": (unique_keys >> 32) + 1,
        "masks": masks.reshape(n, height, width),
    }
