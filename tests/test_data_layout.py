"""Dataset layout: training folders, the test mapping and their failure modes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellseg.data import DataError, check_test_header, check_test_image, load_test_images, scan_train
from cellseg.data.layout import MAPPING_FILE


def test_scan_synthetic(synth_root: Path) -> None:
    items = scan_train(synth_root)
    assert len(items) == 8
    assert [i.item_id for i in items] == sorted(i.item_id for i in items)
    for item in items:
        assert item.image_path == item.folder / "image.tif" and item.image_path.is_file()
        assert set(item.class_paths) <= {1, 2, 3, 4}
        assert all(p == item.folder / f"class{c}.tif" for c, p in item.class_paths.items())


def test_absent_class_files_missing_from_dict(tmp_path: Path, write_sample) -> None:
    write_sample(tmp_path, "b", (4, 4), {3: np.ones((4, 4))})
    write_sample(tmp_path, "a", (4, 4))
    a, b = scan_train(tmp_path)
    assert (a.item_id, a.class_paths) == ("a", {})
    assert b.class_paths == {3: tmp_path / "train" / "b" / "class3.tif"}


def test_stray_files_in_train_ignored_unknown_files_warn(tmp_path: Path, write_sample) -> None:
    folder = write_sample(tmp_path, "a", (4, 4))
    (tmp_path / "train" / "README.txt").write_text("stray")
    (folder / "class5.tif").write_bytes(b"")
    (folder / "notes.txt").write_text("")
    (folder / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"class5\.tif, notes\.txt"):
        items = scan_train(tmp_path)
    assert [i.item_id for i in items] == ["a"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        scan_train(tmp_path / "nope")


def test_no_train_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train/ folder"):
        scan_train(tmp_path)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stray.txt").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        scan_train(tmp_path)


def test_folder_without_image(tmp_path: Path, write_sample) -> None:
    write_sample(tmp_path, "a", (4, 4))
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "class1.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"train/b: training folder without image\.tif"):
        scan_train(tmp_path)


@pytest.fixture
def mapped_root(tmp_path: Path, synth_root: Path) -> Path:
    """A writable copy of the synthetic test mapping and test folder."""
    shutil.copytree(synth_root / "test_release", tmp_path / "test_release")
    shutil.copy(synth_root / MAPPING_FILE, tmp_path / MAPPING_FILE)
    return tmp_path


def _mapping(root: Path) -> list[dict]:
    return json.loads((root / MAPPING_FILE).read_text())


def _set_mapping(root: Path, entries: object) -> None:
    (root / MAPPING_FILE).write_text(json.dumps(entries))


def test_load_test_images(mapped_root: Path) -> None:
    images = load_test_images(mapped_root)
    entries = {e["file_name"]: e for e in _mapping(mapped_root)}
    assert [t.image_id for t in images] == sorted(e["id"] for e in entries.values())
    for t in images:
        e = entries[t.file_name]
        assert (t.image_id, t.height, t.width) == (e["id"], e["height"], e["width"])
        assert t.path == mapped_root / "test_release" / t.file_name


def test_test_folder_fallback(mapped_root: Path) -> None:
    (mapped_root / "test_release").rename(mapped_root / "test")
    assert all(t.path.parent.name == "test" for t in load_test_images(mapped_root))
    shutil.rmtree(mapped_root / "test")
    with pytest.raises(DataError, match="no test folder"):
        load_test_images(mapped_root)


def test_mapping_missing(mapped_root: Path) -> None:
    (mapped_root / MAPPING_FILE).unlink()
    with pytest.raises(DataError, match=f"{MAPPING_FILE}: test mapping not found"):
        load_test_images(mapped_root)


def test_mapping_not_json(mapped_root: Path) -> None:
    (mapped_root / MAPPING_FILE).write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_test_images(mapped_root)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: {"images": m},
        lambda m: [*m[:-1], "x.tif"],
        lambda m: [*m[:-1], {k: v for k, v in m[-1].items() if k != "height"}],
        lambda m: [*m[:-1], {**m[-1], "id": True}],
        lambda m: [*m[:-1], {**m[-1], "id": "7"}],
        lambda m: [*m[:-1], {**m[-1], "width": 0}],
    ],
    ids=["not-a-list", "not-an-object", "missing-key", "bool-id", "string-id", "zero-width"],
)
def test_mapping_wrong_schema(mapped_root: Path, mutate) -> None:
    _set_mapping(mapped_root, mutate(_mapping(mapped_root)))
    with pytest.raises(DataError, match=MAPPING_FILE):
        load_test_images(mapped_root)


def test_mapping_names_missing_file(mapped_root: Path) -> None:
    name = _mapping(mapped_root)[0]["file_name"]
    (mapped_root / "test_release" / name).unlink()
    with pytest.raises(DataError, match=f"entry 0: names .*{name}, which does not exist"):
        load_test_images(mapped_root)


def test_repeated_id(mapped_root: Path) -> None:
    m = _mapping(mapped_root)
    m[1]["id"] = m[0]["id"]
    _set_mapping(mapped_root, m)
    with pytest.raises(DataError, match=f"entry 1: id {m[0]['id']} repeated"):
        load_test_images(mapped_root)


def test_repeated_file_name(mapped_root: Path) -> None:
    m = _mapping(mapped_root)
    m[1]["file_name"] = m[0]["file_name"]
    _set_mapping(mapped_root, m)
    with pytest.raises(DataError, match="entry 1: file_name .* repeated"):
        load_test_images(mapped_root)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/x.tif", "..", "a\\b.tif"])
def test_path_escape(mapped_root: Path, name: str) -> None:
    m = _mapping(mapped_root)
    m[0]["file_name"] = name
    _set_mapping(mapped_root, m)
    with pytest.raises(DataError, match="not a plain file name"):
        load_test_images(mapped_root)


def test_check_test_image(mapped_root: Path) -> None:
    t = load_test_images(mapped_root)[0]
    check_test_image(t, np.zeros((t.height, t.width, 3), np.float32))
    with pytest.raises(DataError, match=f"{t.file_name}: decoded size {t.height}x{t.width + 1}"):
        check_test_image(t, np.zeros((t.height, t.width + 1, 3), np.float32))


def test_check_test_header_reads_only_the_header(mapped_root: Path) -> None:
    t = load_test_images(mapped_root)[0]
    check_test_header(t, max_pixels=t.height * t.width)
    with pytest.raises(DataError, match=f"{t.file_name}: {t.height}x{t.width} pixels .* above the limit"):
        check_test_header(t, max_pixels=t.height * t.width - 1)
    wider = dataclasses.replace(t, width=t.width + 1)
    with pytest.raises(
        DataError,
        match=f"{t.file_name}: size {t.height}x{t.width} .* differs "
        f"from the mapping's {t.height}x{t.width + 1}",
    ):
        check_test_header(wider, max_pixels=10**9)
