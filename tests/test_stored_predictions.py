"""best.pt keeps the best epoch's validation predictions; the run's pictures and the bootstrap
interval use them instead of running the model again, and only on the images they were made on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.checkpoint import BEST, LAST, PICTURES, checkpoint_config, load_checkpoint, save_checkpoint
from cellseg.commands import checkpoint_interval, validation_predictions
from cellseg.config import load_config
from cellseg.data import make_synthetic_dataset
from cellseg.engine import target_truth
from cellseg.evaluation import ImagePrediction
from cellseg.run_pictures import write_run_pictures
from cellseg.stored_predictions import KEY, prediction_state, stored_predictions
from cellseg.training import build_datasets, fit

DEMO = Path(__file__).resolve().parents[1] / "trials" / "demo.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the demo preset at 64-128 px on 12 easy images (3 for validation)."""
    tmp = tmp_path_factory.mktemp("stored")
    root = make_synthetic_dataset(tmp / "data", 12, 1, seed=0, profile="easy")
    overrides = ["train.epochs=1", "model.min_size=64", "model.max_size=128", f"data.root={root}"]
    cfg = load_config(DEMO, [*overrides, "data.val_fraction=0.25"])
    return fit(cfg, run_dir=tmp / "run", progress=False).run_dir


def val_names(state: dict) -> list[str]:
    _, val = build_datasets(checkpoint_config(state))
    return [item.item_id for item in val.items]


def test_best_pt_stores_what_the_model_predicts_on_the_validation_images(trained: Path) -> None:
    state = load_checkpoint(trained / BEST)
    names = val_names(state)
    assert len(names) == 3 and state[KEY]["names"] == names
    stored = stored_predictions(state, names)
    _, split, _ = validation_predictions(trained / BEST, device="cpu")  # the model run again
    assert stored is not None and stored.keys() == split.predictions.keys()
    for image_id, again in split.predictions.items():
        np.testing.assert_allclose(stored[image_id].scores, again.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(stored[image_id].boxes, again.boxes, rtol=0, atol=1e-3)
        assert stored[image_id].rles == again.rles
    assert stored_predictions(state, names[::-1]) is None  # other images: none
    assert stored_predictions(load_checkpoint(trained / LAST), names) is None  # last.pt keeps none


def test_the_interval_and_the_pictures_use_the_stored_predictions_without_the_model(
    trained: Path, tmp_path: Path
) -> None:
    """Stored predictions replaced by the ground truth itself and the weights removed: the
    interval is a perfect 1.0 and the pictures are drawn, so neither ran the model."""
    state = load_checkpoint(trained / BEST)
    names = val_names(state)
    _, val = build_datasets(checkpoint_config(state))
    truths = [target_truth(val[i][1]) for i in range(len(val))]
    perfect = {
        t.image_id: ImagePrediction(
            boxes=np.array([_box(r) for r in t.rles], dtype=np.float32).reshape(-1, 4),
            labels=t.labels,
            scores=np.ones(len(t.labels), dtype=np.float32),
            rles=t.rles,
        )
        for t in truths
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(run_dir / BEST, {**state, "model": {}, KEY: prediction_state(perfect, names)})
    (run_dir / LAST).write_bytes((trained / LAST).read_bytes())
    interval = checkpoint_interval(run_dir / BEST, device="cpu")
    assert interval.value == pytest.approx(1.0) and interval.low == pytest.approx(1.0)
    paths = write_run_pictures(run_dir)
    assert [p.name for p in paths] == ["history.png", "val_0.png", "val_1.png", "val_2.png"]
    assert all(p.parent == run_dir / PICTURES for p in paths)


def test_a_checkpoint_without_them_or_on_another_split_runs_its_model(trained: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained / BEST)
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, {k: v for k, v in state.items() if k != KEY})
    again, stored = checkpoint_interval(plain, device="cpu"), checkpoint_interval(trained / BEST)
    assert again.value == stored.value
    np.testing.assert_array_equal(again.samples, stored.samples)
    moved = tmp_path / "moved.pt"  # another split seed: other validation images
    state["config"]["data"]["split_seed"] = state["config"]["data"]["split_seed"] + 1
    save_checkpoint(moved, {**state, "model": {}})
    with pytest.raises(RuntimeError, match="state_dict"):  # needs the model it no longer has
        checkpoint_interval(moved, device="cpu")


def _box(rle: dict) -> list[float]:
    x, y, w, h = mask_utils.toBbox(rle)
    return [x, y, x + w, y + h]
