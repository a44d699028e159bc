"""The dataset fingerprint: what changes it and what does not (no image is decoded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cellseg.config import DataConfig
from cellseg.data import DataError, dataset_fingerprint


def make_folder(root: Path) -> Path:
    """A dataset in the layout with placeholder bytes: the fingerprint never reads the images."""
    for item, classes in (("a", (1, 2)), ("b", (3,))):
        folder = root / "train" / item
        folder.mkdir(parents=True)
        (folder / "image.tif").write_bytes(b"x" * 100)
        for c in classes:
            (folder / f"class{c}.tif").write_bytes(b"y" * (10 * c))
    (root / "test_image_name_to_ids.json").write_text('[{"file_name": "t.tif", "id": 1}]')
    return root


def digest(root: Path, **split) -> str:
    return dataset_fingerprint(DataConfig(root=str(root), **split)).digest


def test_figures_and_a_moved_copy_keeps_its_fingerprint(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "cells")
    fingerprint = dataset_fingerprint(DataConfig(root=str(root)))
    assert (fingerprint.name, fingerprint.root) == ("cells", str(root.resolve()))
    assert (fingerprint.train_images, fingerprint.train_files, fingerprint.train_bytes) == (2, 5, 260)
    assert len(fingerprint.digest) == 16 and int(fingerprint.digest, 16) >= 0
    assert fingerprint.profile()["split_seed"] == 0
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "cells")
    assert digest(copy) == fingerprint.digest
    (root / "train" / ".DS_Store").write_text("noise")  # operating-system noise is skipped
    (root / "train" / "a" / ".hidden").write_text("noise")
    assert digest(root) == fingerprint.digest


@pytest.mark.parametrize("change", ["size", "rename", "new_item", "mapping", "no_mapping"])
def test_every_data_change_changes_it(tmp_path: Path, change: str) -> None:
    root = make_folder(tmp_path / "cells")
    before = digest(root)
    if change == "size":
        (root / "train" / "a" / "class1.tif").write_bytes(b"y" * 11)
    elif change == "rename":
        (root / "train" / "b").rename(root / "train" / "c")
    elif change == "new_item":
        (root / "train" / "c").mkdir()
        (root / "train" / "c" / "image.tif").write_bytes(b"x")
    elif change == "mapping":  # same size, other bytes
        (root / "test_image_name_to_ids.json").write_text('[{"file_name": "t.tif", "id": 2}]')
    else:
        (root / "test_image_name_to_ids.json").unlink()
    assert digest(root) != before


def test_split_settings_change_it(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "cells")
    assert len({digest(root), digest(root, val_fraction=0.2), digest(root, split_seed=1)}) == 3


def test_no_train_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "train")):
        dataset_fingerprint(DataConfig(root=str(tmp_path)))
