"""Shared fixtures: small synthetic datasets in the real layout, and the optional real slice."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml

from cellseg.config import ModelConfig
from cellseg.data.synth import make_synthetic_dataset
from cellseg.data.tiff_io import write_image, write_mask

if TYPE_CHECKING:
    from torchvision.models.detection import MaskRCNN


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Realistic profile, 8 training and 4 test images of at most 400 px."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", 8, 4, seed=0, max_side=400)


@pytest.fixture(scope="session")
def easy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Easy profile: 24 training and 4 test images with few large, separated cells."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("easy") / "data", 24, 4, seed=1, profile="easy")


REALDATA_UNPACK = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "unpack.sh"


@pytest.fixture(scope="session")
def realdata_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real dataset slice: $CELLSEG_REALDATA, /tmp/realdata/hw3-dev, or unpacked from
    ../shared/realdata beside the checkout; skips when none of them exists."""
    root = Path(os.environ.get("CELLSEG_REALDATA", "/tmp/realdata/hw3-dev"))
    if (root / "train").is_dir():
        return root
    if REALDATA_UNPACK.is_file():
        out = subprocess.run(
            ["bash", str(REALDATA_UNPACK), str(tmp_path_factory.mktemp("real"))],
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(out.stdout.strip().splitlines()[-1])
    pytest.skip(f"real data not found at {root} nor at {REALDATA_UNPACK.parent}")


SampleWriter = Callable[..., Path]


@pytest.fixture
def write_sample() -> SampleWriter:
    """A function writing ``<root>/train/<item_id>/`` with an image and float64 class masks.

    ``masks`` maps class index to an (H, W) id array; the image is a random RGBA of that shape.
    """

    def write(
        root: Path, item_id: str, shape: tuple[int, int], masks: dict[int, np.ndarray] | None = None
    ) -> Path:
        folder = root / "train" / item_id
        folder.mkdir(parents=True)
        rgba = np.random.default_rng(0).integers(0, 256, (*shape, 4), dtype=np.uint8)
        write_image(folder / "image.tif", rgba)
        for c, ids in (masks or {}).items():
            write_mask(folder / f"class{c}.tif", ids)
        return folder

    return write


TRIALS = Path(__file__).resolve().parents[1] / "trials"

TINY_SEARCH_SPACE = """\
params:
  optim.name: {choice: [sgd, adamw]}
  optim.lr: {loguniform: [1.0e-5, 1.0e-2]}
  optim.momentum: {uniform: [0.8, 0.95], if: {optim.name: sgd}}
  model.mask_head_norm: {choice: [false, true]}
baselines: [report_a.yaml]
"""


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base config (the demo preset at 64-128 px, 3 epochs) and a 4-parameter space."""
    folder = tmp_path_factory.mktemp("tiny_search")
    base = folder / "base.yaml"
    raw = yaml.safe_load((TRIALS / "demo.yaml").read_text())
    raw["model"].update(min_size=64, max_size=128)  # a KeyError here if the preset loses a section
    raw["train"]["epochs"] = 3
    base.write_text(yaml.safe_dump(raw, sort_keys=False))
    (folder / "report_a.yaml").write_text((TRIALS / "report_a.yaml").read_text())
    space = folder / "space.yaml"
    space.write_text(TINY_SEARCH_SPACE)
    return {"base": base, "space": space}


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store, made once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, _empty_mlflow_db: Path) -> str:
    """A fresh SQLite tracking URI in ``tmp_path`` (artifacts go to ``tmp_path/mlartifacts``)."""
    shutil.copy(_empty_mlflow_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_maskrcnn() -> Callable[..., MaskRCNN]:
    """A function making torchvision's own Mask R-CNN, untrained (seed 0), in eval mode: a
    ResNet-18 FPN, 5 classes, 64-128 px inputs, every detection kept (a random model's all score
    low); its arguments are the RPN's proposals and the detections per image."""

    def make(*, detections: int, rpn_pre_nms: int = 100, rpn_post_nms: int = 50) -> MaskRCNN:
        import torch
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        torch.manual_seed(0)
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
        return MaskRCNN(
            backbone,
            num_classes=5,
            min_size=64,
            max_size=128,
            box_score_thresh=0.0,
            rpn_pre_nms_top_n_test=rpn_pre_nms,
            rpn_post_nms_top_n_test=rpn_post_nms,
            box_detections_per_img=detections,
        ).eval()

    return make


TINY_MODEL = ModelConfig(
    backbone="resnet18",
    weights="none",
    norm="bn",
    min_size=64,
    max_size=64,
    rpn_pre_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_train=50,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32,
    detections_per_img=20,
    channels_last=False,
    mask_head_channels=32,
    mask_head_convs=1,
    box_head_dim=64,
)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., ModelConfig]:
    """A function giving cellseg's smallest model config (ResNet-18 from scratch, 64 px inputs, a
    few proposals, narrow heads; trains a step in well under a second) with its keyword changes."""
    return functools.partial(dataclasses.replace, TINY_MODEL)
