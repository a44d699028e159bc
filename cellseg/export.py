"""Test-set inference to COCO results and the submission file (test-results.json, optionally zipped)."""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from tqdm import tqdm

from cellseg.atomic_file import write_atomic
from cellseg.evaluation import ImageTruth, coco_results, ground_truth_coco, load_results
from cellseg.predict import predict_images

RESULTS_NAME = "test-results.json"  # the one file name the leaderboard's zip may contain


class MappingEntry(Protocol):
    """One entry of the test mapping (the layout module's ``TestImage`` satisfies it)."""

    file_name: str
    image_id: int
    height: int
    width: int
    path: Path


def export_predictions(
    model: MaskRCNN,
    test_images: Sequence[MappingEntry],
    read_image: Callable[[Path], np.ndarray],
    *,
    device: torch.device | str,
    score_threshold: float,
    progress: bool = True,
) -> list[dict]:
    """COCO results for every test image, predicted one image at a time on ``device``.

    ``read_image`` returns a float32 (H, W, 3) array in [0, 1]; its size must match the mapping's.
    """
    model.eval().to(device)
    results: list[dict] = []
    for test_image in tqdm(test_images, desc="export", disable=not progress):
        array = read_image(test_image.path)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{test_image.file_name}: expected an (H, W, 3) image, got shape {array.shape}")
        if array.shape[:2] != (test_image.height, test_image.width):
            raise ValueError(
                f"{test_image.file_name}: decoded size {array.shape[:2]} differs from the mapping's "
                f"{(test_image.height, test_image.width)}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)
        [prediction] = predict_images(model, [tensor], score_threshold=score_threshold)
        results.extend(coco_results(test_image.image_id, prediction))
    return results


def write_submission(
    results: list[dict], test_images: Sequence[MappingEntry], output: Path, *, zip_path: Path | None = None
) -> None:
    """Validate results against the mapping with pycocotools, then write the JSON (and zip) atomically."""
    mapping = ground_truth_coco(
        [ImageTruth(t.image_id, t.height, t.width, np.zeros(0, dtype=np.int64), []) for t in test_images]
    )
    load_results(mapping, results)
    payload = json.dumps(results).encode("utf-8")
    write_atomic(Path(output), lambda f: f.write(payload))
    if zip_path is not None:
        write_atomic(Path(zip_path), lambda f: _zip_results(f, payload))


def _zip_results(file, payload: bytes) -> None:
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(RESULTS_NAME, payload)
