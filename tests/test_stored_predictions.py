"""best.pt keeps the best epoch's validation predictions; the run's pictures and the bootstrap
interval use them instead of running the model again, and only on the data they were made on."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellseg.checkpoint import BEST, LAST, PICTURES, checkpoint_config, load_checkpoint, save_checkpoint
from cellseg.commands import checkpoint_interval, validation_predictions
from cellseg.config import load_config
from cellseg.data import dataset_fingerprint, make_synthetic_dataset
from cellseg.data.layout import MAPPING_FILE
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


def split_of(state: dict) -> tuple[list[str], str]:
    """The validation images' names and the data's digest of a checkpoint's config."""
    cfg = checkpoint_config(state)
    return build_datasets(cfg)[1].names, dataset_fingerprint(cfg.data).digest


def test_best_pt_stores_what_the_model_predicts_on_the_validation_images(trained: Path) -> None:
    state = load_checkpoint(trained / BEST)
    names, digest = split_of(state)
    assert len(names) == 3 and state[KEY]["names"] == names and state[KEY]["data"] == digest
    stored = stored_predictions(state, names, digest)
    _, split, _ = validation_predictions(trained / BEST, device="cpu")  # the model run again
    assert stored is not None and stored.keys() == split.predictions.keys()
    for image_id, again in split.predictions.items():  # the same batches on the same CPU
        for field in ("boxes", "labels", "scores"):
            np.testing.assert_array_equal(getattr(stored[image_id], field), getattr(again, field))
        assert stored[image_id].rles == again.rles
    assert stored_predictions(state, names[::-1], digest) is None  # other images
    assert stored_predictions(state, names, "another digest") is None  # other data
    unmarked = {**state, KEY: {k: v for k, v in state[KEY].items() if k != "data"}}
    assert stored_predictions(unmarked, names, digest) is None  # no fingerprint: not trusted
    assert stored_predictions(load_checkpoint(trained / LAST), names, digest) is None  # none in last.pt


def perfect_checkpoint(trained: Path, run_dir: Path) -> Path:
    """A copy of the run whose best.pt stores the ground truth as its predictions and has no
    weights: whatever uses it and works did not run the model."""
    state = load_checkpoint(trained / BEST)
    names, digest = split_of(state)
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
    run_dir.mkdir()
    save_checkpoint(run_dir / BEST, {**state, "model": {}, **prediction_state(perfect, names, digest)})
    (run_dir / LAST).write_bytes((trained / LAST).read_bytes())
    return run_dir / BEST


def test_the_interval_and_the_pictures_use_the_stored_predictions_without_the_model(
    trained: Path, tmp_path: Path
) -> None:
    best = perfect_checkpoint(trained, tmp_path / "run")
    interval = checkpoint_interval(best, device="cpu")
    assert interval.value == pytest.approx(1.0) and interval.low == pytest.approx(1.0)
    paths = write_run_pictures(best.parent)
    assert [p.name for p in paths] == ["history.png", "val_0.png", "val_1.png", "val_2.png"]
    assert all(p.parent == best.parent / PICTURES for p in paths)
    # the same data under another root: the same predictions count
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint_config(load_checkpoint(best)).data.root, copy)
    assert checkpoint_interval(best, data_root=str(copy), device="cpu").value == pytest.approx(1.0)


def test_a_checkpoint_without_them_or_on_other_data_runs_its_model(trained: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained / BEST)
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, {k: v for k, v in state.items() if k != KEY})
    again, stored = checkpoint_interval(plain, device="cpu"), checkpoint_interval(trained / BEST)
    assert again.value == stored.value
    np.testing.assert_array_equal(again.samples, stored.samples)

    best = perfect_checkpoint(trained, tmp_path / "run")
    changed = tmp_path / "changed"  # the same training images, another test mapping
    shutil.copytree(checkpoint_config(state).data.root, changed)
    mapping = changed / MAPPING_FILE
    mapping.write_text(mapping.read_text() + "\n")
    with pytest.raises(RuntimeError, match="state_dict"):  # needs the weights it does not have
        checkpoint_interval(best, data_root=str(changed), device="cpu")


def _box(rle: dict) -> list[float]:
    x, y, w, h = mask_utils.toBbox(rle)
    return [x, y, x + w, y + h]
