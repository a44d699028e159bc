"""Decoding one sample: an image plus one instance-id map per class.

An instance is a (class, id) pair with a nonzero id in that class's map. Keeping four int32 maps
instead of one binary mask per instance stays small, keeps ids above 255, and lets a pixel
labelled in two class files belong to both instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cellseg.config import DataConfig
from cellseg.data.layout import (
    CLASS_FILES,
    NUM_CLASSES,
    TestImage,
    TrainItem,
)
from cellseg.data.tiff_io import read_image, read_mask
from cellseg.errors import DataError

GROUND_TRUTH_FOLDER = "test_ground_truth"


def load_label_maps(
    class_paths: Mapping[int, Path], shape: tuple[int, int], *, max_pixels: int = DataConfig.max_pixels
) -> np.ndarray:
    """int32 (4, H, W): class c's instance ids at index c - 1, zeros where its file is absent."""
    label_maps = np.zeros((NUM_CLASSES, *shape), np.int32)
    for c, path in class_paths.items():
        label_maps[c - 1] = read_mask(path, shape, max_pixels=max_pixels)
    return label_maps


def instance_counts(label_maps: np.ndarray) -> list[int]:
    """The number of distinct nonzero ids of each class map."""
    return [len(np.unique(ids[ids != 0])) for ids in label_maps]


def load_sample(
    item: TrainItem, *, max_pixels: int = DataConfig.max_pixels, max_instances: int = DataConfig.max_instances
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 (H, W, 3) image and int32 (4, H, W) label maps of one training folder.

    DataError when a file holds more than ``max_pixels`` (from its header, before decoding) or the
    masks more than ``max_instances`` instances: training makes one H x W mask per instance.
    """
    image = read_image(item.image_path, max_pixels=max_pixels)
    label_maps = load_label_maps(item.class_paths, image.shape[:2], max_pixels=max_pixels)
    counts = instance_counts(label_maps)
    if sum(counts) > max_instances:
        per_file = ", ".join(f"{path.name}: {counts[c - 1]}" for c, path in item.class_paths.items())
        raise DataError(
            f"{item.folder}: its masks hold {sum(counts)} instances ({per_file}), above the limit "
            f"of {max_instances} (data.max_instances); training makes one {image.shape[0]}x"
            f"{image.shape[1]} mask per instance. Check the masks' ids, or raise "
            "data.max_instances (cellseg inspect: --max-instances)"
        )
    return image, label_maps


def ground_truth_maps(root: str | Path, test_image: TestImage) -> np.ndarray:
    """Label maps of one test image from ``<root>/test_ground_truth/<stem>/classN.tif``.

    The synthetic generator writes them so that a submission can be scored locally; the shape
    comes from the mapping's height and width.
    """
    folder = Path(root) / GROUND_TRUTH_FOLDER / Path(test_image.file_name).stem
    if not folder.is_dir():
        raise DataError(f"{folder}: ground-truth folder of {test_image.file_name} not found")
    class_paths = {c: folder / n for n, c in CLASS_FILES.items() if (folder / n).is_file()}
    return load_label_maps(class_paths, (test_image.height, test_image.width))
