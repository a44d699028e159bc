"""Every picture function writes a non-empty PNG, tolerating sparse inputs."""

import numpy as np
import pytest

from cellseg.evaluation import ImagePrediction, coco_results, truth_from_masks
from cellseg.plots import (
    plot_class_distribution,
    plot_history,
    plot_intervals,
    plot_parallel_coordinates,
    plot_predictions,
    plot_trial_curves,
)

PNG_SIGNATURE = b"\x89PNG"


def assert_png(path):
    assert path.exists() and path.read_bytes().startswith(PNG_SIGNATURE)


@pytest.fixture
def sample():
    masks = np.zeros((3, 30, 40), dtype=np.uint8)
    masks[0, 2:10, 2:10] = masks[1, 12:20, 5:25] = masks[2, 22:28, 30:38] = 1
    truth = truth_from_masks(1, masks, np.array([1, 2, 4]))
    prediction = ImagePrediction(
        boxes=np.array([[2, 2, 10, 10], [5, 12, 25, 20], [30, 22, 38, 28]], dtype=float),
        labels=np.array([1, 3, 4]),
        scores=np.array([0.9, 0.6, 0.2]),
        rles=truth.rles,
    )
    return np.random.default_rng(0).random((30, 40, 3)), truth, prediction


def test_plot_history(tmp_path):
    history = [
        {"epoch": 1, "loss": 2.0, "loss_mask": 0.7, "val_loss": 1.9},
        {"epoch": 2, "loss": 1.5, "val_loss": 1.6, "segm_AP50": 0.2, "segm_AP": 0.1},
        {"epoch": 3, "loss": 1.2, "segm_AP50": 0.3, "bbox_AP50": 0.35},
    ]
    assert_png(plot_history(history, tmp_path / "history.png"))
    assert_png(plot_history([], tmp_path / "empty.png"))


def test_plot_predictions(tmp_path, sample):
    image, truth, prediction = sample
    assert_png(plot_predictions(image, truth, prediction, tmp_path / "sub" / "pred.png", score_threshold=0.5))


def test_plot_class_distribution(tmp_path, sample):
    _, _, prediction = sample
    assert_png(plot_class_distribution(coco_results(1, prediction), tmp_path / "classes.png"))
    assert_png(plot_class_distribution([], tmp_path / "none.png"))


def test_plot_trial_curves(tmp_path):
    curves = {"trial_a": [(1, 0.1), (2, 0.3)], "trial_b": [(1, 0.05)], "trial_c": []}
    assert_png(plot_trial_curves(curves, tmp_path / "curves.png"))


def test_plot_parallel_coordinates(tmp_path):
    rows = [
        {"optim.lr": 1e-3, "optim.name": "adam", "model.backbone": "resnet18", "segm_AP50": 0.3},
        {"optim.lr": 5e-3, "optim.name": "sgd", "model.backbone": "resnet50", "segm_AP50": 0.4},
        {"optim.lr": 5e-3, "optim.name": "sgd", "model.backbone": "resnet50", "segm_AP50": None},
        {
            "optim.lr": np.float32(2e-3),
            "optim.name": "sgd",
            "model.backbone": "resnet50",
            "segm_AP50": float("nan"),
        },
    ]
    assert_png(plot_parallel_coordinates(rows, "segm_AP50", tmp_path / "parallel.png"))
    assert_png(plot_parallel_coordinates(rows[:1], "segm_AP50", tmp_path / "single.png"))
    assert_png(plot_parallel_coordinates([], "segm_AP50", tmp_path / "empty.png"))


def test_plot_intervals(tmp_path):
    names, values = ["trial_a", "trial_b"], [0.8, 0.7]
    assert_png(plot_intervals(names, values, [0.6, 0.7], [0.9, 0.7], tmp_path / "intervals.png", "segm_AP50"))
    assert_png(plot_intervals(names[:1], values[:1], [0.6], [0.9], tmp_path / "one.png", "segm_AP50"))
