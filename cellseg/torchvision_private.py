"""The torchvision helpers cellseg uses that are not documented API, in one place.

Checked against torchvision ``TESTED_WITH`` (the pin in pyproject.toml);
``tests/test_torchvision_private.py`` fails on any other version until each helper below is
checked again, and fails on any version where one of them no longer behaves as used here.
"""

from __future__ import annotations

from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes

TESTED_WITH = "0.29.1"  # torchvision version these helpers were last checked against

__all__ = ["TESTED_WITH", "BoxCoder", "expand_boxes", "expand_masks", "resize_boxes"]
