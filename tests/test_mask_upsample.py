"""The mask predictor's upsampling as a 1x1 convolution gives torch's transposed convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from cellseg import mask_upsample
from cellseg.config import ModelConfig
from cellseg.mask_upsample import MaskUpsample
from cellseg.model import build_model
from cellseg.precision import mixed_precision


def _pair(channels: int, out: int, seed: int) -> tuple[nn.ConvTranspose2d, MaskUpsample]:
    torch.manual_seed(seed)
    conv = nn.ConvTranspose2d(channels, out, 2, stride=2)
    nn.init.normal_(conv.bias)  # torchvision's are zero: a wrong bias order would not show
    return conv, MaskUpsample.of(conv)


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last).requires_grad_(True)


def _values_and_gradients(module: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Output (through an in-place ReLU, as in the predictor) and gradients of input and parameters."""
    y = torch.relu_(module(x))
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y.float() * weights).sum(), [x, *module.parameters()])
    return [y, *grads]


@pytest.mark.parametrize(
    ("channels", "out", "regions", "side"), [(8, 8, 3, 14), (6, 10, 1, 5), (16, 4, 7, 1), (8, 8, 0, 14)]
)
def test_same_values_and_gradients_as_transposed_convolution(channels, out, regions, side) -> None:
    conv, upsample = _pair(channels, out, seed=side)
    x = _input((regions, channels, side, side + 2), seed=channels)
    assert type(upsample(x).grad_fn).__name__ == "_InterleaveBackward"  # the 1x1 path ran
    got = _values_and_gradients(upsample, x, seed=out)
    expected = _values_and_gradients(conv, x, seed=out)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert got[0].shape == (regions, out, 2 * side, 2 * side + 4)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[0]._base is None  # not a view: the in-place ReLU takes autograd's plain path


def test_bf16_training_step_matches_torch_under_autocast() -> None:
    if not mixed_precision(torch.device("cpu")):
        pytest.skip("this CPU does not compute bf16")
    conv, upsample = _pair(32, 32, seed=0)
    x = _input((5, 32, 14, 14), seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _values_and_gradients(upsample, x, seed=2)
        expected = _values_and_gradients(conv, x, seed=2)
    assert got[0].dtype == torch.bfloat16
    for g, e in zip(got, expected, strict=True):  # bf16 rounds sums of thousands of terms
        scale = float(e.detach().float().abs().max())
        torch.testing.assert_close(g.float(), e.float(), rtol=0, atol=2e-2 * scale)


def test_predictions_and_other_layouts_run_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def interleave(y: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the 1x1 path ran")

    monkeypatch.setattr(mask_upsample._Interleave, "apply", interleave)
    conv, upsample = _pair(4, 4, seed=3)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)  # NCHW
    torch.testing.assert_close(upsample(x), conv(x))
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(upsample(cl), conv(cl))


def test_of_shares_parameters_and_leaves_the_random_state() -> None:
    conv = nn.ConvTranspose2d(4, 6, 2, stride=2)
    state = torch.get_rng_state()
    upsample = MaskUpsample.of(conv)
    assert torch.equal(torch.get_rng_state(), state)
    assert upsample.weight is conv.weight and upsample.bias is conv.bias
    with pytest.raises(ValueError, match="2x2 stride-2"):
        MaskUpsample.of(nn.ConvTranspose2d(4, 6, 3, stride=2))
    with pytest.raises(ValueError, match="2x2 stride-2"):
        MaskUpsample.of(nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False))


def test_models_mask_predictor_keeps_torchvisions_parameters() -> None:
    """Checkpoints written before the predictor had ``MaskUpsample`` load, and the other way."""
    cfg = ModelConfig(backbone="resnet18", weights="none", mask_head_channels=16)
    predictor = build_model(cfg).roi_heads.mask_predictor
    assert isinstance(predictor.conv5_mask, MaskUpsample)
    reference = MaskRCNNPredictor(16, 16, predictor.mask_fcn_logits.out_channels)
    assert predictor.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(predictor.state_dict())
    predictor.load_state_dict(reference.state_dict())
