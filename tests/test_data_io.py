"""TIFF reading and writing: image formats, mask ids and every broken-file case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.data import DataError, read_image, read_mask, scan_train, write_image, write_mask
from cellseg.data.tiff_io import image_shape


def _rgba(h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    return rgba


def test_rgba_lzw_roundtrip_drops_alpha(tmp_path: Path) -> None:
    rgba = _rgba()
    write_image(tmp_path / "a.tif", rgba)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
        assert tif.pages[0].shape == (6, 5, 4)
    image = read_image(tmp_path / "a.tif")
    assert image.dtype == np.float32 and image.shape == (6, 5, 3)
    np.testing.assert_allclose(image, rgba[..., :3] / 255.0, atol=1e-7)


def test_rgb_uint8(tmp_path: Path) -> None:
    rgb = _rgba()[..., :3]
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb")
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), rgb / 255.0, atol=1e-7)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1)])
def test_grayscale_is_replicated(tmp_path: Path, shape: tuple[int, ...]) -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(shape) * 8
    tifffile.imwrite(tmp_path / "g.tif", gray, photometric="minisblack")
    image = read_image(tmp_path / "g.tif")
    assert image.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_allclose(image[..., c], gray.reshape(6, 5) / 255.0, atol=1e-7)


def test_uint16_scaling(tmp_path: Path) -> None:
    gray = np.array([[0, 32768, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", gray, photometric="minisblack")
    np.testing.assert_allclose(read_image(tmp_path / "g.tif")[0, :, 0], [0, 32768 / 65535, 1])


def test_float_image_in_unit_range_kept(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), rgb)


@pytest.mark.parametrize(
    "array, photometric, message",
    [
        (np.full((4, 4, 3), 2.0, np.float32), "rgb", "lie in"),
        (np.zeros((4, 4, 5), np.uint8), "minisblack", "shape"),
        (np.zeros((4, 4), np.int8), "minisblack", "int8"),
    ],
    ids=["float-out-of-range", "five-channels", "int8"],
)
def test_unsupported_images(tmp_path: Path, array: np.ndarray, photometric: str, message: str) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, array, photometric=photometric, planarconfig="contig")
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        read_image(path)


def test_not_a_tiff_names_file(tmp_path: Path) -> None:
    path = tmp_path / "image.tif"
    path.write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match=f"{path}.*not a readable TIFF"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nothing.tif")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(tmp_path: Path, keep: float) -> None:
    write_image(tmp_path / "full.tif", _rgba(64, 64))
    data = (tmp_path / "full.tif").read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=str(path)):
        read_image(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    path.write_bytes(b"II*\x00\xff\xff\x00\x00")  # valid magic, first page beyond the end
    with pytest.raises(DataError, match=f"{path}.*holds no image"):
        read_image(path)


def test_mask_float64_ids_above_255_kept(tmp_path: Path) -> None:
    ids = np.zeros((5, 7))
    ids[0, :2], ids[1, :2], ids[4, 6] = 256, 300, 70000
    write_mask(tmp_path / "class2.tif", ids)
    with tifffile.TiffFile(tmp_path / "class2.tif") as tif:
        assert tif.pages[0].dtype == np.float64
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
    mask = read_mask(tmp_path / "class2.tif", (5, 7))
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, ids.astype(np.int32))
    assert set(np.unique(mask)) == {0, 256, 300, 70000}


def test_integer_mask_accepted(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    tifffile.imwrite(tmp_path / "m.tif", ids)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif", (3, 4)), ids)


def test_mask_shape_mismatch_says_both(tmp_path: Path) -> None:
    write_mask(tmp_path / "class1.tif", np.zeros((5, 7)))
    with pytest.raises(DataError, match=r"class1\.tif.*\(5, 7\).*\(7, 5\)"):
        read_mask(tmp_path / "class1.tif", (7, 5))


@pytest.mark.parametrize(
    "value, message",
    [(1.5, "non-integer"), (-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite"), (2.0**31, "above")],
)
def test_bad_mask_values(tmp_path: Path, value: float, message: str) -> None:
    ids = np.zeros((3, 3))
    ids[1, 1] = value
    path = tmp_path / "class3.tif"
    write_mask(path, ids)
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        read_mask(path, (3, 3))


def test_image_shape_from_header(tmp_path: Path) -> None:
    write_image(tmp_path / "a.tif", _rgba(9, 4))
    assert image_shape(tmp_path / "a.tif") == (9, 4)


def test_real_files(realdata_root: Path) -> None:
    item = next(i for i in scan_train(realdata_root) if i.class_paths)
    image = read_image(item.image_path)
    assert image.dtype == np.float32 and image.shape[2] == 3
    assert 0 <= image.min() <= image.max() <= 1
    masks = [read_mask(p, image.shape[:2]) for p in item.class_paths.values()]
    raw_max = max(tifffile.imread(p).max() for p in item.class_paths.values())
    assert max(m.max() for m in masks) == raw_max
