"""Reading and writing the dataset's TIFF files: RGBA LZW images and float64 instance-id masks.

Every read takes the size from the file's header first and refuses a file above ``max_pixels``
(``data.max_pixels``) or of an unexpected shape before any pixel is decoded: a few MB of LZW
zeros can hold a 20000 x 20000 image that decodes to gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from cellseg.config import DataConfig
from cellseg.errors import DataError

MAX_ID = 2**31 - 1  # ids are held as int32
_LZW_STRIP_BYTES = 8192  # the real images use strips of about 8 KB


def _open(path: Path) -> tifffile.TiffFile:
    """An open TIFF file with at least one page, or DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many types for broken files
        raise _unreadable(path, exc) from exc
    if not tif.pages:
        tif.close()
        raise DataError(f"{path}: TIFF file holds no image (truncated?); re-download it")
    return tif


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc}); "
        "re-download or re-export it (LZW images need the imagecodecs package)"
    )


def _header_shape(path: Path, tif: tifffile.TiffFile, max_pixels: int) -> tuple[int, ...]:
    """The first page's shape from the header, or DataError when it holds over max_pixels."""
    page = tif.pages[0]
    height, width = int(page.imagelength), int(page.imagewidth)
    if height * width > max_pixels:
        raise DataError(
            f"{path}: {height}x{width} pixels (HxW, {height * width / 1e6:.1f} megapixels) is "
            f"above the limit of {max_pixels / 1e6:g} megapixels (data.max_pixels); shrink or "
            "tile the image, or raise data.max_pixels (cellseg inspect: --max-pixels)"
        )
    return tuple(int(n) for n in page.shape)


def _read_array(path: Path, max_pixels: int, check_shape: Callable[[tuple[int, ...]], None]) -> np.ndarray:
    """The first page of a TIFF file, decoded only once its header passed the pixel limit and
    ``check_shape``; DataError naming the file otherwise."""
    with _open(path) as tif:
        check_shape(_header_shape(path, tif, max_pixels))
        try:
            return tif.pages[0].asarray()
        except Exception as exc:
            raise _unreadable(path, exc) from exc


def image_shape(path: str | Path, *, max_pixels: int = DataConfig.max_pixels) -> tuple[int, int]:
    """(height, width) of a TIFF image from its header, without decoding the pixels."""
    path = Path(path)
    with _open(path) as tif:
        shape = _header_shape(path, tif, max_pixels)
    return shape[0], shape[1]


def read_image(path: str | Path, *, max_pixels: int = DataConfig.max_pixels) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 1] from RGBA, RGB or grayscale, uint8/uint16/float."""
    path = Path(path)

    def check_shape(shape: tuple[int, ...]) -> None:
        if not (len(shape) == 2 or len(shape) == 3 and shape[2] in (1, 2, 3, 4)):
            raise DataError(
                f"{path}: image of shape {shape} is neither (H, W) nor (H, W, 1|2|3|4) channels; "
                "save it as grayscale, RGB or RGBA"
            )

    raw = _read_array(path, max_pixels, check_shape)
    if raw.ndim == 2:
        raw = raw[:, :, None]
    raw = raw[:, :, :3] if raw.shape[2] >= 3 else raw[:, :, :1]  # drop alpha
    if raw.dtype == np.uint8:
        image = raw.astype(np.float32) / 255.0
    elif raw.dtype == np.uint16:
        image = raw.astype(np.float32) / 65535.0
    elif raw.dtype.kind == "f":
        image = raw.astype(np.float32)
        if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
            raise DataError(
                f"{path}: float image values must be finite and lie in [0, 1]; rescale it or save it as uint8"
            )
    else:
        raise DataError(f"{path}: image type {raw.dtype} unsupported; save it as uint8 or uint16")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def read_mask(
    path: str | Path, shape: tuple[int, int], *, max_pixels: int = DataConfig.max_pixels
) -> np.ndarray:
    """An int32 (H, W) instance-id map (0 = background) from a float or integer TIFF mask.

    ``shape`` is the (height, width) of the image the mask belongs to.
    """
    path = Path(path)

    def check_shape(header: tuple[int, ...]) -> None:
        if header not in (tuple(shape), (*shape, 1)):
            raise DataError(
                f"{path}: mask shape {header} differs from its image's shape {tuple(shape)}; "
                "a class mask must be (H, W) with the image's height and width"
            )

    raw = _read_array(path, max_pixels, check_shape)
    if raw.ndim == 3:
        raw = raw[:, :, 0]
    fix = "each pixel must hold 0 (background) or a positive integer instance id"
    if raw.dtype.kind not in "fiub":
        raise DataError(f"{path}: mask type {raw.dtype} unsupported; {fix}")
    if raw.size == 0:
        return np.zeros(raw.shape, np.int32)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise DataError(f"{path}: mask holds NaN or infinite values; {fix}")
    low, high = raw.min(), raw.max()
    if low < 0:
        raise DataError(f"{path}: mask holds negative values (min {low}); {fix}")
    if high > MAX_ID:
        raise DataError(f"{path}: mask holds ids up to {high}, above {MAX_ID}; renumber the ids")
    ids = raw.astype(np.int32)
    if raw.dtype.kind == "f" and (ids != raw).any():
        raise DataError(f"{path}: mask holds non-integer values; {fix}")
    return ids


def write_image(path: str | Path, rgba: np.ndarray) -> None:
    """Write an (H, W, 4) uint8 RGBA image, LZW-compressed with a horizontal predictor."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"write_image needs (H, W, 4) uint8, got {rgba.shape} {rgba.dtype}")
    rows = max(1, _LZW_STRIP_BYTES // (rgba.shape[1] * 4))
    tifffile.imwrite(
        path,
        rgba,
        photometric="rgb",
        compression="lzw",
        predictor=True,
        rowsperstrip=rows,
        metadata=None,
        software=False,
    )


def write_mask(path: str | Path, ids: np.ndarray) -> None:
    """Write an (H, W) instance-id map as an uncompressed float64 TIFF, one row per strip."""
    if ids.ndim != 2:
        raise ValueError(f"write_mask needs an (H, W) array, got shape {ids.shape}")
    tifffile.imwrite(
        path, ids.astype(np.float64), photometric="minisblack", rowsperstrip=1, metadata=None, software=False
    )
