"""The mask predictor's upsampling (torchvision's ``conv5_mask``) as a 1x1 convolution on a CPU.

A 2x2 transposed convolution with stride 2 writes each input pixel to its own 2x2 output block,
with no overlap: it is a 1x1 convolution to four times the channels, one group per position in
the block, whose outputs are then interleaved. oneDNN's transposed convolution runs at about half
the rate of its 1x1 convolution on a CPU's channels-last maps in a training step, where it runs
on every positive region (``bench/mask_upsample.py``). Same weights, same state dict keys and the
same values up to the rounding of the sums. Without gradients (predictions over hundreds of
regions per image) it measured no faster, so torch's kernel runs there, as on other devices
and layouts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskUpsample(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)``, computed in a training
    step on a CPU's channels-last maps as a 1x1 convolution, then its four positions interleaved."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, 2, stride=2, device=device, dtype=dtype)

    @classmethod
    def of(cls, conv: nn.ConvTranspose2d) -> MaskUpsample:
        """A ``MaskUpsample`` holding ``conv``'s parameters (no new initialisation, so the random
        state and hence the rest of the model's initial weights stay as they were)."""
        shape = (conv.kernel_size, conv.stride, conv.padding, conv.output_padding, conv.dilation)
        if shape != ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1)) or conv.groups != 1 or conv.bias is None:
            raise ValueError(f"not a 2x2 stride-2 transposed convolution with a bias: {conv}")
        upsample = nn.utils.skip_init(cls, conv.in_channels, conv.out_channels)
        upsample.weight, upsample.bias = conv.weight, conv.bias
        return upsample

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if (
            x.device.type != "cpu"
            or not channels_last
            or not torch.is_grad_enabled()
            or output_size is not None
        ):
            return super().forward(x, output_size)
        out = self.out_channels
        # (in, out, dy, dx) -> (dy, dx, out) output channels of a 1x1 convolution
        weight = self.weight.permute(2, 3, 1, 0).reshape(4 * out, self.in_channels, 1, 1)
        return _Interleave.apply(F.conv2d(x, weight, self.bias.repeat(4)))


def _blocks(x: Tensor, channels: int) -> Tensor:
    """A channels-last (N, C, 2H, 2W) map as an (N, H, dy, W, dx, C) view of its memory."""
    n, _, height, width = x.shape
    return x.permute(0, 2, 3, 1).view(n, height // 2, 2, width // 2, 2, channels)


def _positions(y: Tensor, channels: int) -> Tensor:
    """A channels-last (N, 4C, H, W) map, channels in (dy, dx, C) order, as an (N, H, dy, W, dx, C)
    view of its memory."""
    n, _, height, width = y.shape
    return y.permute(0, 2, 3, 1).view(n, height, width, 2, 2, channels).transpose(2, 3)


class _Interleave(torch.autograd.Function):
    """(N, 4C, H, W) with channels in (dy, dx, C) order -> (N, C, 2H, 2W), channels-last both.

    A function of its own, not a view: the predictor's in-place ReLU on a view of it would run
    its backward pass through autograd's slow path for modified views."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        n, channels, height, width = y.shape[0], y.shape[1] // 4, y.shape[2], y.shape[3]
        shape = (n, channels, 2 * height, 2 * width)
        out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        _blocks(out, channels).copy_(_positions(y.contiguous(memory_format=torch.channels_last), channels))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous(memory_format=torch.channels_last)
        n, channels, height, width = grad.shape
        shape = (n, 4 * channels, height // 2, width // 2)
        y = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
        _positions(y, channels).copy_(_blocks(grad, channels))
        return y
