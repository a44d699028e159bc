"""Writing TIFF files for the tests that real data never holds: huge, yet small on disk."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

HUGE = 20_000  # a side: 400 megapixels, 1.6 GB as RGBA uint8, about 1.4 MB of LZW zeros on disk


def write_zeros_lzw(path: Path, shape: tuple[int, ...], dtype: type) -> Path:
    """A TIFF of zeros written from one LZW-encoded strip repeated: quick and small on disk."""
    rows = 64
    row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    full, last = (imagecodecs.lzw_encode(bytes(row_bytes * n)) for n in (rows, shape[0] % rows or rows))
    strips = [full] * (-(-shape[0] // rows) - 1) + [last]
    tifffile.imwrite(
        path,
        data=iter(strips),
        shape=shape,
        dtype=dtype,
        compression="lzw",
        rowsperstrip=rows,
        photometric="rgb" if len(shape) == 3 else "minisblack",
        metadata=None,
    )
    return path
