"""RoIAlign for the CPU as one ``embedding_bag`` per feature level.

torchvision's CPU ``roi_align`` walks the regions one at a time on one thread, and its backward
pass scatters one value at a time; with hundreds of regions per image it is most of a validation
pass on the CPU. Each output value of RoIAlign is a weighted sum of feature vectors at a fixed
number of positions (sampling ratio squared times the four bilinear corners), which is exactly
``embedding_bag`` in ``sum`` mode over the feature map seen as a table of (pixel, channel) rows:
vectorised over channels, threaded, with a fast backward pass. Same sampling, clamping and
averaging as torchvision's ``roi_align`` with ``aligned=False``; on CUDA torchvision's kernel runs.
Which level pools a region, and each level's scale, stay torchvision's: ``MultiScaleRoIAlign``
infers them on its first call and keeps them in its public ``scales`` and ``map_levels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign


def _axis_samples(
    start: Tensor, length: Tensor, bins: int, ratio: int, size: Tensor
) -> tuple[Tensor, Tensor]:
    """Sample corners and bilinear weights along one axis, as torchvision computes them.

    ``start``, ``length`` and ``size`` (of the feature map) are per region, in feature-map pixels.
    Returns (K, bins, ratio, 2) indices of the low and high neighbour and their weights, zero
    for samples outside the map.
    """
    step = (length / bins)[:, None]
    bin_index = torch.arange(bins, device=start.device, dtype=start.dtype).repeat_interleave(ratio)
    within = (torch.arange(ratio, device=start.device, dtype=start.dtype) + 0.5).repeat(bins)
    pos = start[:, None] + bin_index * step + within * step / ratio
    size = size[:, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.long()
    at_edge = low >= size - 1
    low = torch.minimum(low, size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weights = torch.stack([1.0 - frac, frac], dim=-1) * inside[..., None]
    index = torch.stack([low, high], dim=-1)
    return index.view(-1, bins, ratio, 2), weights.view(-1, bins, ratio, 2)


def roi_align_cpu(
    levels: list[Tensor],
    rois: Tensor,
    level_of: Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """torchvision's ``roi_align`` (aligned=False, fixed sampling ratio), each region pooled from
    the feature level ``level_of`` names.

    ``levels`` are (N, C, H_l, W_l) maps with spatial scales ``scales``; ``rois`` is (K, 5) rows
    of (image index, x1, y1, x2, y2) in image pixels. Returns (K, C, out_h, out_w), in
    channels-last memory layout, in float32 for bf16 or float16 maps (under autocast): regions in
    bf16 would round to whole pixels above 128 and to 4 px steps above 512.
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be at least 1, got {sampling_ratio}")
    out_h, out_w = output_size
    n, channels = levels[0].shape[:2]
    k = rois.shape[0]
    device, dtype = levels[0].device, torch.promote_types(levels[0].dtype, torch.float32)
    heights = torch.tensor([f.shape[2] for f in levels], device=device)
    widths = torch.tensor([f.shape[3] for f in levels], device=device)
    starts = torch.cumsum(n * heights * widths, dim=0) - n * heights * widths
    height, width, start = heights[level_of], widths[level_of], starts[level_of]
    scale = torch.tensor(scales, device=device, dtype=dtype)[level_of]
    rois = rois.to(dtype)
    x1, y1 = rois[:, 1] * scale, rois[:, 2] * scale
    roi_w = (rois[:, 3] * scale - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * scale - y1).clamp(min=1.0)
    rows, row_w = _axis_samples(y1, roi_h, out_h, sampling_ratio, height)
    cols, col_w = _axis_samples(x1, roi_w, out_w, sampling_ratio, width)
    r = sampling_ratio
    # One bag per output value (k, out_y, out_x) over (sample_y, sample_x, corner_y, corner_x).
    base = start + rois[:, 0].long() * height * width
    per_region = (k, 1, 1, 1, 1, 1, 1)
    index = (
        base.view(per_region)
        + rows.view(k, out_h, 1, r, 1, 2, 1) * width.view(per_region)
        + cols.view(k, 1, out_w, 1, r, 1, 2)
    )
    weight = row_w.view(k, out_h, 1, r, 1, 2, 1) * col_w.view(k, 1, out_w, 1, r, 1, 2) / (r * r)
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels).to(dtype) for f in levels]).contiguous()
    bags, per_bag = k * out_h * out_w, 4 * r * r
    pooled = F.embedding_bag(
        index.reshape(bags, per_bag), table, per_sample_weights=weight.reshape(bags, per_bag), mode="sum"
    )
    return pooled.view(k, out_h, out_w, channels).permute(0, 3, 1, 2)


class CellRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with :func:`roi_align_cpu` for CPU tensors."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int) -> None:
        if sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be at least 1, got {sampling_ratio}")
        super().__init__(featmap_names, output_size, sampling_ratio)

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        levels = [feature for name, feature in x.items() if name in self.featmap_names]
        if levels[0].device.type != "cpu":
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            # torchvision's own forward on no regions sets scales and map_levels, at no cost
            super().forward(x, [b[:0] for b in boxes], image_shapes)
        assert self.scales is not None and self.map_levels is not None
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        level_of = (
            self.map_levels(boxes)
            if len(levels) > 1
            else torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        )
        return roi_align_cpu(levels, rois, level_of, self.scales, self.output_size, self.sampling_ratio)
