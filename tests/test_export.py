"""Test-set export: one image at a time, validated with pycocotools, written atomically (+ zip)."""

import contextlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from torchvision.models.detection import MaskRCNN

from cellseg.errors import DataError
from cellseg.export import export_predictions, write_submission


@dataclass
class Entry:
    file_name: str
    image_id: int
    height: int
    width: int
    path: Path


MAPPING = [Entry("a.tif", 3, 33, 35, Path("a.tif")), Entry("b.tif", 8, 50, 90, Path("b.tif"))]
IMAGES = {
    entry.path: np.random.default_rng(entry.image_id).random((entry.height, entry.width, 3))
    for entry in MAPPING
}


@pytest.fixture(scope="module")
def model(tiny_maskrcnn) -> MaskRCNN:
    return tiny_maskrcnn(detections=10)


def mapping_coco() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": e.image_id, "height": e.height, "width": e.width, "file_name": e.file_name}
            for e in MAPPING
        ],
        "categories": [{"id": k} for k in range(1, 5)],
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_export_writes_results_accepted_by_load_res(model, tmp_path):
    results = export_predictions(
        [model], MAPPING, IMAGES.__getitem__, device="cpu", score_threshold=0.0, progress=False
    )
    assert {r["image_id"] for r in results} == {3, 8}
    output, archive = tmp_path / "out" / "test-results.json", tmp_path / "submission.zip"
    write_submission(results, MAPPING, output, zip_path=archive)
    written = json.loads(output.read_text())
    assert written == results
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = mapping_coco().loadRes(str(output))
    assert len(loaded.anns) == len(results)
    assert all(loaded.anns[i]["segmentation"]["size"] == [33, 35] for i in loaded.getAnnIds(imgIds=[3]))
    with zipfile.ZipFile(archive) as z:
        assert z.namelist() == ["test-results.json"]
        assert json.loads(z.read("test-results.json")) == results
    assert [p.name for p in output.parent.iterdir()] == ["test-results.json"]


def test_tta_and_ensemble_export_results_accepted_by_load_res(model, tmp_path):
    plain = export_predictions(
        [model], MAPPING, IMAGES.__getitem__, device="cpu", score_threshold=0.0, progress=False
    )
    twice = export_predictions(
        [model, model], MAPPING, IMAGES.__getitem__, device="cpu", score_threshold=0.0, progress=False
    )
    assert [(r["image_id"], r["category_id"], r["segmentation"]) for r in twice] == [
        (r["image_id"], r["category_id"], r["segmentation"]) for r in plain
    ]  # twins merge to one
    results = export_predictions(
        [model, model],
        MAPPING,
        IMAGES.__getitem__,
        device="cpu",
        score_threshold=0.0,
        flips=["hflip", "vflip"],
        iou_threshold=0.5,
        progress=False,
    )
    for image_id in (3, 8):
        assert 0 < sum(r["image_id"] == image_id for r in results) <= 10  # the model's limit
    output = tmp_path / "test-results.json"
    write_submission(results, MAPPING, output)
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = mapping_coco().loadRes(str(output))
    assert len(loaded.anns) == len(results)
    with pytest.raises(ValueError, match="'rot90'"):
        export_predictions(
            [model],
            MAPPING,
            IMAGES.__getitem__,
            device="cpu",
            score_threshold=0.0,
            flips=["rot90"],
            progress=False,
        )


def test_size_mismatch_names_the_file(model):
    wrong = [Entry("wrong.tif", 1, 34, 35, Path("a.tif"))]
    with pytest.raises(DataError, match=r"a\.tif: decoded size .* differs from the mapping"):
        export_predictions(
            [model], wrong, IMAGES.__getitem__, device="cpu", score_threshold=0.0, progress=False
        )


def test_empty_results_write_an_empty_list(tmp_path):
    output = tmp_path / "test-results.json"
    write_submission([], MAPPING, output, zip_path=tmp_path / "s.zip")
    assert json.loads(output.read_text()) == []
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        assert z.namelist() == ["test-results.json"]


def test_invalid_results_are_not_written(tmp_path):
    bad = [
        {
            "image_id": 4,
            "category_id": 1,
            "bbox": [0, 0, 1, 1],
            "score": 0.5,
            "segmentation": {"size": [33, 35], "counts": "0"},
        }
    ]
    output = tmp_path / "test-results.json"
    with pytest.raises(DataError, match="image_id"):
        write_submission(bad, MAPPING, output)
    assert not output.exists()
