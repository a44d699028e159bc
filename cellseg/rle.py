"""COCO run-length encoding of instance masks, the format of the submission's segmentations.

Compressed RLE (pycocotools) with ``counts`` as str, so that it goes into JSON as it is.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of one (H, W) binary mask, with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_region(region: np.ndarray, top: int, left: int, image_size: tuple[int, int]) -> dict:
    """``encode_mask`` of an (H, W) mask that is zero outside ``region`` placed at (top, left).

    Runs are found in the region only, so the cost follows the region's area, not the image's.
    """
    height, width = image_size
    rows, cols = region.shape
    if not (0 <= top and top + rows <= height and 0 <= left and left + cols <= width):
        raise ValueError(f"region {region.shape} at ({top}, {left}) leaves the {image_size} image")
    gap = int(rows < height)  # a zero row stands for the pixels between two column segments
    # Column-major pixels of the region, between a zero before and a zero after it.
    sequence = np.zeros((rows + gap) * cols + 2, dtype=np.int8)
    sequence[1:-1].reshape((rows + gap, cols), order="F")[:rows] = region != 0
    changes = np.flatnonzero(sequence[1:] != sequence[:-1])
    column, row = np.divmod(changes, rows + gap)
    starts = (left + column) * height + top + row
    starts = starts[starts < height * width]  # a run that ends with the image
    counts = np.diff(starts, prepend=0, append=height * width)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def counts_str(rle: dict) -> str:
    """An RLE's ``counts`` as str, whether pycocotools gave bytes or str."""
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
