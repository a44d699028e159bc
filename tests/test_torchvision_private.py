"""The torchvision helpers of cellseg.torchvision_private exist and behave as cellseg uses them.

A torchvision upgrade fails here first: re-check each helper, then update TESTED_WITH.
"""

from __future__ import annotations

import torch
import torchvision

from cellseg import torchvision_private as tvp


def test_pinned_version() -> None:
    installed = torchvision.__version__.split("+")[0]
    assert installed == tvp.TESTED_WITH, (
        f"torchvision {installed} is installed but cellseg/torchvision_private.py was checked "
        f"against {tvp.TESTED_WITH}: re-check its helpers, then update TESTED_WITH"
    )


def test_expand_masks_pads_and_returns_the_scale() -> None:
    masks = torch.rand(3, 1, 28, 28)
    padded, scale = tvp.expand_masks(masks, padding=1)
    assert padded.shape == (3, 1, 30, 30)
    assert scale == 30 / 28
    assert torch.equal(padded[:, :, 1:-1, 1:-1], masks)
    assert padded[:, :, 0].abs().sum() == 0 and padded[:, :, :, -1].abs().sum() == 0


def test_expand_boxes_scales_about_the_centre() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert torch.equal(tvp.expand_boxes(boxes, 1.5), torch.tensor([[5.0, 10.0, 35.0, 70.0]]))


def test_resize_boxes_maps_between_image_sizes() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    got = tvp.resize_boxes(boxes, [100, 200], [50, 400])  # (height, width) before and after
    assert torch.equal(got, torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


def test_box_coder_decodes_in_the_deltas_dtype() -> None:
    """cellseg.model.Float32BoxCoder exists because decode casts the boxes to the deltas' dtype;
    when this fails, torchvision changed how it decodes: re-check whether the wrapper is needed."""
    coder = tvp.BoxCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=4.0)
    assert coder.weights == (10.0, 10.0, 5.0, 5.0) and coder.bbox_xform_clip == 4.0
    boxes = torch.tensor([[1029.0, 20.0, 1061.0, 52.0]])
    decoded = coder.decode(torch.zeros(1, 4), [boxes])
    assert decoded.shape == (1, 1, 4) and torch.equal(decoded[0], boxes)
    rounded = coder.decode(torch.zeros(1, 4, dtype=torch.bfloat16), [boxes])
    assert rounded.dtype == torch.bfloat16 and rounded[0, 0, 0].item() == 1032.0  # 4 px steps
