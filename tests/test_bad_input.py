"""A generated corpus of broken datasets, each checked through ``cellseg inspect`` as a user runs it.

Every broken file gives one clear error naming the file (exit code 2); what a user would rather
skip gives a warning naming it and the command goes on (exit code 0). docs/reliability.md lists
which is which.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellseg.cli import main as cellseg_main
from cellseg.config import Config, DataConfig, apply_overrides
from cellseg.data import CellDataset, DataError, dataset_stats, scan_train
from cellseg.data.layout import MAPPING_FILE
from cellseg.data.synth import make_synthetic_dataset
from cellseg.data.tiff_io import write_image, write_mask
from cellseg.training import build_loaders
from tiffutil import HUGE, write_zeros_lzw


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("corpus") / "data", 3, 2, seed=3, max_side=96, max_cells=20
    )


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


def noise_masks(root: Path) -> Path:
    """A 100 x 100 image whose class1.tif holds 10000 instances, one per pixel."""
    folder = first_item(root)
    for path in folder.glob("class*.tif"):
        path.unlink()
    write_image(folder / "image.tif", np.zeros((100, 100, 4), np.uint8))
    write_mask(folder / "class1.tif", np.arange(1, 10_001, dtype=np.float64).reshape(100, 100))
    return folder


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
    "mapping-duplicate-name": (
        edit_mapping(lambda m: [m[0], {**m[1], "file_name": m[0]["file_name"]}]),
        "repeated",
    ),
    "mapping-path-escape": (
        edit_mapping(lambda m: [{**m[0], "file_name": "../../etc/passwd"}]),
        "not a plain file name",
    ),
    "mapping-not-json": (overwrite(lambda r: r / MAPPING_FILE, "[{"), "not valid JSON"),
    "mapping-wrong-schema": (edit_mapping(lambda m: [{**m[0], "height": "tall"}]), "expected an object"),
    "too-many-instances": (noise_masks, "10000 instances (class1.tif: 10000"),
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


def broken_test_image_of_another_size(root: Path) -> Path:
    """A test image whose header differs from the mapping and whose pixels cannot be decoded."""
    path = first_test(root)
    tifffile.imwrite(path, np.zeros((7, 9, 4), np.uint8), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    return path


def empty_masks(root: Path) -> Path:
    for path in first_item(root).glob("class*.tif"):
        write_mask(path, np.zeros_like(tifffile.imread(path)))
    return first_item(root)


WARNINGS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "stray-file": (stray_file, "ignoring unexpected files notes.txt"),
    "unmapped-test-image": (unmapped_test_image, f"not in {MAPPING_FILE}, ignored"),
    "test-size-differs-from-mapping": (resize_test_image, "differs from the mapping"),
    "test-size-differs-not-decoded": (broken_test_image_of_another_size, "not decoded"),
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
    edit_mapping(lambda m: [{**e, "file_name": odd.name} if e["file_name"] == old.name else e for e in m])(
        root
    )
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


HUGE_FILES: dict[str, Callable[[Path], Path]] = {
    "train-image": lambda r: write_zeros_lzw(first_item(r) / "image.tif", (HUGE, HUGE, 4), np.uint8),
    "mask": lambda r: write_zeros_lzw(mask_file(r), (HUGE, HUGE), np.float64),
    "test-image": lambda r: write_zeros_lzw(first_test(r), (HUGE, HUGE, 4), np.uint8),
}
# Runs `cellseg inspect` on each folder in one process, printing after each its exit code and the
# process's peak resident memory so far (Linux: KB); the first folder is intact, the baseline.
INSPECT_WITH_PEAK_RSS = """
import resource, sys
from cellseg.cli import main
for root in sys.argv[1:]:
    code = main(["inspect", root, "--json"])
    print("peak", code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def test_huge_tiffs_are_refused_from_their_header_in_bounded_memory(template, tmp_path):
    broken = {where: broken_copy(template, tmp_path / where, mutate) for where, mutate in HUGE_FILES.items()}
    assert all(path.stat().st_size < 4_000_000 for _, path in broken.values())
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            INSPECT_WITH_PEAK_RSS,
            str(template),
            *(str(root) for root, _ in broken.values()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    peaks = [line.split() for line in done.stderr.splitlines() if line.startswith("peak ")]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert [code for _, code, _ in peaks] == ["0", "2", "2", "2"], done.stderr
    limit = f"above the limit of {DataConfig.max_pixels / 1e6:g} megapixels"
    for (_, path), error in zip(broken.values(), errors, strict=True):
        assert str(path) in error and f"{HUGE}x{HUGE} pixels" in error and limit in error, error
    baseline_kb = int(peaks[0][2])
    grown_mb = (int(peaks[-1][2]) - baseline_kb) / 1000
    assert grown_mb < 300, f"{grown_mb:.0f} MB above an intact dataset's peak: a file was decoded"


def test_training_refuses_a_sample_above_the_limits(template, tmp_path):
    root, folder = broken_copy(template, tmp_path, noise_masks)
    item = next(i for i in scan_train(root) if i.folder == folder)
    with pytest.raises(DataError, match=f"{folder}: its masks hold 10000 instances"):
        CellDataset([item], max_instances=9999)[0]
    assert len(CellDataset([item], max_instances=10_000)[0][1]["labels"]) >= 10_000
    with pytest.raises(DataError, match=f"{item.image_path}: .* above the limit of 0.0001 mega"):
        CellDataset([item], max_pixels=100)[0]


def test_training_takes_the_limits_from_the_config(template, tmp_path):
    root, folder = broken_copy(template, tmp_path, noise_masks)
    cfg = apply_overrides(
        Config(),
        {"data.root": str(root), "data.max_instances": 9999, "model.min_size": 64, "model.max_size": 128},
    )
    train, val, _ = build_loaders(cfg, torch.device("cpu"))
    with pytest.raises(DataError, match=f"{folder}: its masks hold 10000 instances"):
        for loader in (train, val):
            list(loader)
