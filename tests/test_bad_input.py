"""A generated corpus of broken datasets, each checked through ``cellseg inspect`` as a user runs it.

Every broken file gives one clear error naming the file (exit code 2); what a user would rather
skip gives a warning naming it and the command goes on (exit code 0). docs/reliability.md lists
which is which.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile

from cellseg.cli import main as cellseg_main
from cellseg.data import dataset_stats
from cellseg.data.layout import MAPPING_FILE
from cellseg.data.synth import make_synthetic_dataset
from cellseg.data.tiff_io import write_image, write_mask


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("corpus") / "data", 3, 2, seed=3,
                                  max_side=96, max_cells=20)


def first_item(root: Path) -> Path:
    return sorted((root / "train").iterdir())[0]


def first_test(root: Path) -> Path:
    """The test image of the mapping's first entry."""
    return root / "test_release" / json.loads((root / MAPPING_FILE).read_text())[0]["file_name"]


def mask_file(root: Path) -> Path:
    return sorted(first_item(root).glob("class*.tif"))[0]


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def rewrite_mask(value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        path = mask_file(root)
        tifffile.imwrite(path, value(tifffile.imread(path)))
        return path
    return mutate


def edit_mapping(edit: Callable[[list[dict]], list]) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        path = root / MAPPING_FILE
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return path
    return mutate


def overwrite(locate: Callable[[Path], Path], text: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        path = locate(root)
        path.write_text(text)
        return path
    return mutate


def set_pixel(mask: np.ndarray, value: float) -> np.ndarray:
    mask = mask.astype(np.float64)
    mask[0, 0] = value
    return mask


def empty_train(root: Path) -> Path:
    for folder in (root / "train").iterdir():
        shutil.rmtree(folder)
    return root / "train"


def empty_item(root: Path) -> Path:
    (root / "train" / "zz-empty").mkdir()
    return root / "train" / "zz-empty"


def empty_test_folder(root: Path) -> Path:
    path = first_test(root)
    for image in (root / "test_release").iterdir():
        image.unlink()
    return path


def int32_image(root: Path) -> Path:
    path = first_item(root) / "image.tif"
    tifffile.imwrite(path, np.ones((8, 8, 3), np.int32), photometric="rgb")
    return path


def wrong_size_mask(root: Path) -> Path:
    path = mask_file(root)
    mask = tifffile.imread(path)
    write_mask(path, np.zeros((mask.shape[0] + 1, mask.shape[1]), np.float64))
    return path


ERRORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated-image": (lambda r: truncate(first_item(r) / "image.tif"), "not a readable TIFF"),
    "truncated-mask": (lambda r: truncate(mask_file(r)), "not a readable TIFF"),
    "truncated-test-image": (lambda r: truncate(first_test(r)), "not a readable TIFF"),
    "not-a-tiff": (overwrite(lambda r: first_item(r) / "image.tif", "hello"), "not a readable TIFF"),
    "image-dtype-int32": (int32_image, "image type int32 unsupported"),
    "mask-dtype-complex": (rewrite_mask(lambda m: m.astype(np.complex64)), "mask type complex64"),
    "mask-size-differs": (wrong_size_mask, "differs from its image's shape"),
    "nan-in-mask": (rewrite_mask(lambda m: set_pixel(m, np.nan)), "NaN or infinite"),
    "negative-id": (rewrite_mask(lambda m: set_pixel(m, -3)), "negative values"),
    "fractional-id": (rewrite_mask(lambda m: set_pixel(m, 2.5)), "non-integer values"),
    "huge-id": (rewrite_mask(lambda m: set_pixel(m, 2.0**40)), "renumber the ids"),
    "empty-train": (empty_train, "empty dataset"),
    "empty-item-folder": (empty_item, "training folder without image.tif"),
    "empty-test-folder": (empty_test_folder, "which does not exist"),
    "mapping-duplicate-id": (edit_mapping(lambda m: [m[0], {**m[1], "id": m[0]["id"]}]), "repeated"),
    "mapping-duplicate-name": (edit_mapping(lambda m: [m[0], {**m[1], "file_name": m[0]["file_name"]}]),
                               "repeated"),
    "mapping-path-escape": (edit_mapping(lambda m: [{**m[0], "file_name": "../../etc/passwd"}]),
                            "not a plain file name"),
    "mapping-not-json": (overwrite(lambda r: r / MAPPING_FILE, "[{"), "not valid JSON"),
    "mapping-wrong-schema": (edit_mapping(lambda m: [{**m[0], "height": "tall"}]), "expected an object"),
}


def broken_copy(template: Path, folder: Path, mutate: Callable[[Path], Path]) -> tuple[Path, Path]:
    """A copy of the template dataset in ``folder`` with ``mutate`` applied; the root and the
    path that ``mutate`` broke."""
    root = folder / "data"
    shutil.copytree(template, root)
    return root, mutate(root)


@pytest.mark.parametrize("case", ERRORS)
def test_broken_input_is_one_clear_error_naming_the_file(case, template, tmp_path, capsys):
    mutate, message = ERRORS[case]
    root, path = broken_copy(template, tmp_path, mutate)
    assert cellseg_main(["inspect", str(root), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and message in err, err


def stray_file(root: Path) -> Path:
    path = first_item(root) / "notes.txt"
    path.write_text("my notes")
    return path


def unmapped_test_image(root: Path) -> Path:
    path = root / "test_release" / "extra.tif"
    shutil.copy(first_test(root), path)
    return path


def resize_test_image(root: Path) -> Path:
    path = first_test(root)
    write_image(path, np.zeros((7, 9, 4), np.uint8))
    return path


def empty_masks(root: Path) -> Path:
    for path in first_item(root).glob("class*.tif"):
        write_mask(path, np.zeros_like(tifffile.imread(path)))
    return first_item(root)


WARNINGS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "stray-file": (stray_file, "ignoring unexpected files notes.txt"),
    "unmapped-test-image": (unmapped_test_image, f"not in {MAPPING_FILE}, ignored"),
    "test-size-differs-from-mapping": (resize_test_image, "differs from the mapping"),
    "image-without-instances": (empty_masks, "no instances in any class file"),
}


@pytest.mark.parametrize("case", WARNINGS)
def test_skippable_input_is_a_warning_and_the_command_goes_on(case, template, tmp_path, capsys):
    mutate, message = WARNINGS[case]
    root, path = broken_copy(template, tmp_path, mutate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cellseg_main(["inspect", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    said = stats["warnings"] + [str(w.message) for w in caught]
    assert any(message in w and str(path.parent) in w and path.name in w for w in said), said


def test_odd_names_large_ids_and_os_noise_are_fine(template, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(template, root)
    first_item(root).rename(root / "train" / "-odd name ü #1")
    old = first_test(root)
    odd = old.with_name("spaced ü (1).tif")
    old.rename(odd)
    edit_mapping(lambda m: [{**e, "file_name": odd.name} if e["file_name"] == old.name else e
                            for e in m])(root)
    path = mask_file(root)
    mask = tifffile.imread(path)
    write_mask(path, np.where(mask > 0, mask + 70_000, 0))
    for folder in (root, root / "train", first_item(root), root / "test_release"):
        (folder / ".DS_Store").write_bytes(b"\x00")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert cellseg_main(["inspect", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    expected = dataset_stats(template, detections_per_img=100, progress=False)
    assert stats["instances_per_class"] == expected["instances_per_class"]
    assert stats["num_test_images"] == expected["num_test_images"]
    assert len(stats["warnings"]) == len(expected["warnings"])

