"""The resize rule shared by data and model: both scale as torchvision does, so a sample the
dataset shrank passes the model's transform untouched; data and model never import each other."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cellseg.config import ModelConfig
from cellseg.data.resize import downscale_sample
from cellseg.model import build_model

TINY = ModelConfig(
    backbone="resnet18", weights="none", norm="bn", min_size=64, max_size=96, upscale_small=True
)


def _target(height: int, width: int) -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 10:40, 5:30] = 1
    masks[1, 50:, 60:] = 1
    return {
        "boxes": torch.tensor([[5.0, 10.0, 30.0, 40.0], [60.0, 50.0, width, height]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }


@pytest.mark.parametrize("shape", [(150, 130), (40, 50), (300, 90)])
def test_model_transform_resizes_as_torchvision(shape) -> None:
    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    ours = build_model(TINY).transform.eval()
    theirs = GeneralizedRCNNTransform(64, 96, [0.0] * 3, [1.0] * 3).eval()
    got_image, got = ours.resize(image, _target(*shape))
    want_image, want = theirs.resize(image, _target(*shape))
    assert torch.equal(got_image, want_image)
    for key in ("boxes", "masks", "labels"):
        assert torch.equal(got[key], want[key]), key


def test_a_sample_the_dataset_shrank_passes_the_transform_untouched() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((300, 200, 3), dtype=np.float32)
    maps = np.zeros((4, 300, 200), np.int32)
    maps[1, 20:120, 30:90] = 7
    small_image, _ = downscale_sample(image, maps, TINY.min_size, TINY.max_size)
    assert small_image.shape[:2] != image.shape[:2]
    tensor = torch.from_numpy(small_image.transpose(2, 0, 1).copy())
    out, _ = build_model(TINY).transform.eval().resize(tensor)
    assert out is tensor


def test_data_and_model_do_not_import_each_other() -> None:
    code = (
        "import sys, cellseg.{0}; bad = sorted(m for m in sys.modules if m.startswith("
        "'cellseg.{1}')); assert not bad, bad"
    )
    for a, b in (("model", "data"), ("data", "model")):
        subprocess.run([sys.executable, "-c", code.format(a, b)], check=True)
