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
from cellseg.data.layout import check_test_image
from cellseg.evaluation import ImageTruth, coco_results, ground_truth_coco, load_results
from cellseg.inference_settings import InferenceSettings, predict_with_settings
from cellseg.predict import predict_images
from cellseg.tta import DEFAULT_IOU_THRESHOLD, check_flips, model_detector, predict_merged

RESULTS_NAME = "test-results.json"  # the one file name the leaderboard's zip may contain


class MappingEntry(Protocol):
    """One entry of the test mapping (the layout module's ``TestImage`` satisfies it)."""

    file_name: str
    image_id: int
    height: int
    width: int
    path: Path


def export_predictions(
    models: Sequence[MaskRCNN],
    test_images: Sequence[MappingEntry],
    read_image: Callable[[Path], np.ndarray],
    *,
    device: torch.device | str,
    score_threshold: float,
    flips: Sequence[str] = (),
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    settings: InferenceSettings | None = None,
    progress: bool = True,
) -> list[dict]:
    """COCO results for every test image, predicted one image at a time on ``device``.

    One model without ``flips`` predicts as ``cellseg.predict`` does; several models (an
    ensemble) or flips (test-time augmentation) are merged by ``cellseg.tta``'s rule, matching at
    box IoU ``iou_threshold`` and keeping as many detections as the most generous model. Tuned
    ``settings`` (they hold their own scales, flips, ensemble size, merge IoU and score threshold;
    ``models`` best first) replace all that with ``cellseg.inference_settings.predict_with_settings``.
    ``read_image`` returns a float32 (H, W, 3) array in [0, 1]; its size must match the mapping's.
    """
    if not models:
        raise ValueError("export_predictions needs at least one model")
    if settings is not None and (len(models) < settings.models or flips):
        raise ValueError(
            f"tuned inference settings merge {settings.models} model(s) ({len(models)} given) and hold "
            "their own flips"
        )
    flips = check_flips(flips)
    for model in models:
        model.eval().to(device)
    detectors = [model_detector(model) for model in models]
    max_detections = max(model.roi_heads.detections_per_img for model in models)
    results: list[dict] = []
    for test_image in tqdm(test_images, desc="export", disable=not progress):
        array = read_image(test_image.path)
        check_test_image(test_image, array)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)
        if settings is not None:
            prediction = predict_with_settings(models, tensor.to(device), settings)
        elif len(models) == 1 and not flips:
            [prediction] = predict_images(models[0], [tensor], score_threshold=score_threshold)
        else:
            prediction = predict_merged(
                detectors,
                tensor.to(device),
                flips=flips,
                iou_threshold=iou_threshold,
                max_detections=max_detections,
                score_threshold=score_threshold,
            )
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


def write_provenance(path: Path, provenance: dict) -> None:
    """The JSON record of which model made a submission, written atomically beside it."""
    payload = (json.dumps(provenance, indent=2) + "\n").encode("utf-8")
    write_atomic(Path(path), lambda f: f.write(payload))


def _zip_results(file, payload: bytes) -> None:
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(RESULTS_NAME, payload)
