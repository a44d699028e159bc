"""Shrinking a sample before its masks are made gives what torchvision's transform would give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cellseg.data.resize import downscale_sample, model_scale
from cellseg.data.targets import targets_from_label_maps


def blobs(height: int, width: int, seed: int) -> np.ndarray:
    """Label maps (4, H, W) with 12 rectangles of at least 12 px per side, ids above 65535."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((4, height, width), np.int32)
    for i in range(12):
        y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
        h, w = rng.integers(12, 40), rng.integers(12, 40)
        maps[i % 4, y : y + h, x : x + w] = 70_000 + i
    return maps


@pytest.mark.parametrize(
    "shape, sizes", [((300, 200), (100, 160)), ((157, 413), (64, 128)), ((240, 240), (120, 1333))]
)
def test_masks_and_image_match_torchvision_resize(shape, sizes) -> None:
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    maps = blobs(*shape, seed=1)
    full = {k: torch.from_numpy(v) for k, v in targets_from_label_maps(maps).items()}
    torchvisions = GeneralizedRCNNTransform(sizes[0], sizes[1], [0.0] * 3, [1.0] * 3).eval()
    expected_image, expected = torchvisions.resize(
        torch.from_numpy(image.transpose(2, 0, 1).copy()), dict(full)
    )
    small_image, small_maps = downscale_sample(image, maps, *sizes)
    got = targets_from_label_maps(small_maps)
    assert small_image.shape[:2] == tuple(expected_image.shape[-2:])
    assert np.allclose(small_image.transpose(2, 0, 1), expected_image.numpy(), atol=1e-5)
    assert np.array_equal(got["labels"], full["labels"].numpy())
    assert np.array_equal(got["masks"], expected["masks"].numpy())


def test_no_change_when_the_model_would_not_shrink() -> None:
    image, maps = np.zeros((50, 60, 3), np.float32), blobs(50, 60, seed=2)
    assert model_scale(50, 60, 800, 1333) > 1
    out_image, out_maps = downscale_sample(image, maps, 800, 1333)
    assert out_image is image and out_maps is maps
