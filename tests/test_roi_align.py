"""cellseg's CPU RoIAlign gives torchvision's values and gradients."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from cellseg.roi_align import CellRoIAlign, roi_align_cpu


def _rois(generator: torch.Generator, count: int, images: int, side: float) -> torch.Tensor:
    """Random boxes in a ``side`` x ``side`` image, plus boxes that leave it or are degenerate."""
    corner = torch.rand(count, 2, generator=generator) * side
    size = torch.rand(count, 2, generator=generator) * side / 4
    boxes = torch.cat([corner, corner + size], dim=1)
    edge_cases = torch.tensor(
        [
            [-30.0, -30.0, 10.0, 10.0],  # starts outside
            [side - 2, side - 3, side + 30, side + 40],  # ends outside
            [5.0, 5.0, 5.0, 5.0],  # empty
            [0.0, 0.0, side, side],  # the whole image
            [-50.0, 3.0, -20.0, 9.0],
        ]
    )  # entirely outside
    boxes = torch.cat([boxes, edge_cases])
    index = torch.randint(0, images, (len(boxes), 1), generator=generator).float()
    return torch.cat([index, boxes], dim=1)


@pytest.mark.parametrize(
    ("output_size", "ratio", "images", "side"),
    [((7, 7), 2, 1, 32), ((14, 14), 2, 2, 20), ((3, 5), 1, 2, 9), ((4, 4), 3, 1, 16)],
)
def test_same_values_and_gradients_as_torchvision(output_size, ratio, images, side) -> None:
    generator = torch.Generator().manual_seed(side)
    features = torch.randn(images, 8, side, side + 3, generator=generator, requires_grad=True)
    rois = _rois(generator, 60, images, side * 4.0)
    expected = roi_align(features, rois, output_size, 0.25, ratio)
    level = torch.zeros(len(rois), dtype=torch.int64)
    got = roi_align_cpu([features], rois, level, [0.25], output_size, ratio)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(expected.shape, generator=generator)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), features)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), features)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-5)


def test_multi_level_pooling_matches_torchvision() -> None:
    generator = torch.Generator().manual_seed(0)
    names = ["0", "1", "2", "3"]
    features = {
        name: torch.randn(2, 16, 96 >> level, 128 >> level, generator=generator)
        for level, name in enumerate(names)
    }
    features["pool"] = torch.randn(2, 16, 3, 4, generator=generator)  # not pooled from
    boxes = [
        torch.tensor(
            [
                [0.0, 0.0, 380.0, 300.0],
                [10.0, 10.0, 20.0, 22.0],
                [5.0, 5.0, 200.0, 250.0],
                [100.0, 40.0, 160.0, 90.0],
            ]
        ),
        torch.tensor([[50.0, 60.0, 90.0, 100.0], [0.0, 0.0, 500.0, 380.0]]),
    ]
    shapes = [(384, 512), (380, 500)]
    for size in (7, 14):
        expected = MultiScaleRoIAlign(names, size, 2)(features, boxes, shapes)
        got = CellRoIAlign(names, size, 2)(features, boxes, shapes)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_maps_pool_in_float32_at_exact_positions() -> None:
    """Under CPU autocast the maps are bf16; positions in bf16 would round (8 px steps here)."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 8, 40, 520, generator=generator).to(torch.bfloat16).requires_grad_()
    rois = torch.tensor([[0.0, 1500.3, 20.7, 1533.9, 61.2], [0.0, 2041.5, 3.3, 2070.1, 40.9]])
    level = torch.zeros(len(rois), dtype=torch.int64)
    got = roi_align_cpu([features], rois, level, [0.25], (7, 7), 2)
    expected = roi_align(features.detach().float(), rois, (7, 7), 0.25, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), features)
    assert grad.dtype == torch.bfloat16 and grad.abs().sum() > 0


def test_no_regions_and_bad_sampling_ratio() -> None:
    features = {"0": torch.randn(1, 4, 8, 8)}
    pooled = CellRoIAlign(["0"], 7, 2)(features, [torch.zeros(0, 4)], [(32, 32)])
    assert pooled.shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match="sampling_ratio"):
        CellRoIAlign(["0"], 7, 0)
