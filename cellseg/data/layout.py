"""The dataset layout on disk: training folders, the test mapping and the test folder.

```
<root>/train/<id>/image.tif, class1.tif ... class4.tif (any class file may be absent)
<root>/test_release/<name>.tif (or <root>/test/<name>.tif)
<root>/test_image_name_to_ids.json: [{"file_name", "id", "height", "width"}, ...]
```
Names starting with "." (``.DS_Store``, ``.ipynb_checkpoints``) are operating-system noise and
are skipped everywhere.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.data.tiff_io import image_shape
from cellseg.errors import DataError
from cellseg.task import NUM_CLASSES

CLASS_FILES = {f"class{c}.tif": c for c in range(1, NUM_CLASSES + 1)}
IMAGE_FILE = "image.tif"
MAPPING_FILE = "test_image_name_to_ids.json"
TEST_FOLDERS = ("test_release", "test")


@dataclass(frozen=True)
class TrainItem:
    """One training folder: its image and the class files present (class index -> path)."""

    item_id: str
    folder: Path
    image_path: Path
    class_paths: dict[int, Path] = field(hash=False)


@dataclass(frozen=True)
class TestImage:
    """One entry of the test mapping, with the path of its image."""

    file_name: str
    image_id: int
    height: int
    width: int
    path: Path


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _dataset_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; pass the folder that holds train/")
    return root


def scan_train(root: str | Path) -> list[TrainItem]:
    """Every training folder under ``<root>/train``, sorted by id; unknown files only warn."""
    train = _dataset_root(root) / "train"
    if not train.is_dir():
        raise DataError(f"{train}: no train/ folder; the root must hold train/<id>/image.tif")
    items = []
    for folder in (p for p in _visible(train) if p.is_dir()):
        names = {p.name for p in _visible(folder)}
        if IMAGE_FILE not in names:
            raise DataError(f"{folder}: training folder without {IMAGE_FILE}; add it or remove the folder")
        unknown = sorted(names - {IMAGE_FILE} - CLASS_FILES.keys())
        if unknown:
            warnings.warn(
                f"{folder}: ignoring unexpected files {', '.join(unknown)} "
                f"(a training folder holds {IMAGE_FILE} and class1.tif ... class{NUM_CLASSES}.tif)",
                stacklevel=2,
            )
        class_paths = {c: folder / n for n, c in sorted(CLASS_FILES.items()) if n in names}
        items.append(TrainItem(folder.name, folder, folder / IMAGE_FILE, class_paths))
    if not items:
        raise DataError(f"{train}: empty dataset, no training folders (train/<id>/image.tif) found")
    return items


def find_test_folder(root: str | Path) -> Path:
    """``<root>/test_release`` or, failing that, ``<root>/test``."""
    root = _dataset_root(root)
    for name in TEST_FOLDERS:
        if (root / name).is_dir():
            return root / name
    expected = " or ".join(f"{n}/" for n in TEST_FOLDERS)
    raise DataError(f"{root}: no test folder; expected {expected}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _parse_entry(entry: object, where: str) -> tuple[str, int, int, int]:
    keys = ("file_name", "id", "height", "width")
    schema = 'an object {"file_name": str, "id": int > 0, "height": int > 0, "width": int > 0}'
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise DataError(f"{where}: expected {schema}, got {entry!r}")
    name, image_id, height, width = (entry[k] for k in keys)
    if not isinstance(name, str) or not all(map(_positive_int, (image_id, height, width))):
        raise DataError(f"{where}: expected {schema}, got {entry!r}")
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise DataError(
            f"{where}: file_name {name!r} is not a plain file name inside the test folder; "
            "the mapping may only name files of that folder"
        )
    return name, image_id, height, width


def load_test_images(root: str | Path) -> list[TestImage]:
    """The test images named by ``test_image_name_to_ids.json``, sorted by image id."""
    mapping = _dataset_root(root) / MAPPING_FILE
    if not mapping.is_file():
        raise DataError(f"{mapping}: test mapping not found; it ships with the test images")
    try:
        entries = json.loads(mapping.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{mapping}: not valid JSON ({exc}); re-download the mapping") from exc
    if not isinstance(entries, list):
        raise DataError(f"{mapping}: expected a JSON list of image entries")
    folder = find_test_folder(root)
    images: list[TestImage] = []
    names: set[str] = set()
    ids: set[int] = set()
    for i, entry in enumerate(entries):
        where = f"{mapping}: entry {i}"
        name, image_id, height, width = _parse_entry(entry, where)
        if name in names:
            raise DataError(f"{where}: file_name {name!r} repeated; each image must appear once")
        if image_id in ids:
            raise DataError(f"{where}: id {image_id} repeated; image ids must be unique")
        path = folder / name
        if not path.is_file():
            raise DataError(f"{where}: names {path}, which does not exist")
        names.add(name)
        ids.add(image_id)
        images.append(TestImage(name, image_id, height, width, path))
    for path in (p for p in _visible(folder) if p.is_file() and p.name not in names):
        warnings.warn(
            f"{path}: not in {MAPPING_FILE}, ignored (add it to the mapping to predict it)", stacklevel=2
        )
    return sorted(images, key=lambda t: t.image_id)


def check_test_header(test_image: TestImage, *, max_pixels: int) -> None:
    """DataError if a test image's size in its header differs from the mapping's height and width
    or exceeds ``max_pixels``; no pixel is decoded."""
    height, width = image_shape(test_image.path, max_pixels=max_pixels)
    if (height, width) != (test_image.height, test_image.width):
        raise DataError(
            f"{test_image.path}: size {height}x{width} (HxW) in its header differs from the "
            f"mapping's {test_image.height}x{test_image.width}; fix {MAPPING_FILE}"
        )


def check_test_image(test_image: TestImage, image: np.ndarray) -> None:
    """DataError if a decoded test image's size differs from the mapping's height and width."""
    if tuple(image.shape[:2]) != (test_image.height, test_image.width):
        raise DataError(
            f"{test_image.path}: decoded size {image.shape[0]}x{image.shape[1]} (HxW) differs from "
            f"the mapping's {test_image.height}x{test_image.width}; fix {MAPPING_FILE}"
        )
