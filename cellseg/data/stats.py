"""Dataset statistics for ``cellseg inspect``: sizes, instance counts, areas and warnings.

Every image and mask is decoded as training and export decode it, so a broken file is found here,
before a search, with the same error naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cellseg.config import DataConfig
from cellseg.data.layout import MAPPING_FILE, NUM_CLASSES, load_test_images, scan_train
from cellseg.data.sample import load_sample
from cellseg.data.tiff_io import image_shape, read_image

PERCENTILES = (5, 25, 50, 75, 95)


def _size_summary(shapes: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """min / median / max of heights and of widths, each taken separately."""
    if not shapes:
        return {}
    array = np.asarray(shapes)
    return {
        axis: {
            "min": int(array[:, i].min()),
            "median": float(np.median(array[:, i])),
            "max": int(array[:, i].max()),
        }
        for i, axis in enumerate(("height", "width"))
    }


def dataset_stats(
    root: str | Path,
    detections_per_img: int,
    *,
    max_pixels: int = DataConfig.max_pixels,
    max_instances: int = DataConfig.max_instances,
    progress: bool = True,
) -> dict[str, Any]:
    """Scan the training masks (and the test mapping, when present) of a dataset.

    ``image_size`` and ``test_image_size`` give min/median/max of heights and of widths taken
    separately. Areas are in pixels; a class without instances has ``None`` percentiles. Files
    and images above the limits are the errors training gives (``load_sample``).
    """
    items = scan_train(root)
    warnings: list[str] = []
    shapes: list[tuple[int, int]] = []
    per_image: list[int] = []
    areas: dict[int, list[np.ndarray]] = {c: [] for c in range(1, NUM_CLASSES + 1)}
    images_with: dict[int, int] = dict.fromkeys(areas, 0)
    for item in tqdm(items, desc="scanning train", unit="image", file=sys.stderr, disable=not progress):
        image, label_maps = load_sample(item, max_pixels=max_pixels, max_instances=max_instances)
        shapes.append(image.shape[:2])
        count = 0
        for c in areas:
            ids, sizes = np.unique(label_maps[c - 1], return_counts=True)
            sizes = sizes[ids != 0]
            areas[c].append(sizes)
            images_with[c] += bool(len(sizes))
            count += len(sizes)
        per_image.append(count)
        if not count:
            warnings.append(f"{item.folder}: no instances in any class file (valid, but check it)")
        if count > detections_per_img:
            warnings.append(
                f"{item.folder}: {count} instances, more than detections_per_img="
                f"{detections_per_img}; raise model.detections_per_img or lose recall"
            )

    test_shapes: list[tuple[int, int]] = []
    if (Path(root) / MAPPING_FILE).is_file():
        for test_image in load_test_images(root):
            test_shapes.append((test_image.height, test_image.width))
            actual = image_shape(test_image.path, max_pixels=max_pixels)
            if actual != test_shapes[-1]:
                warnings.append(
                    f"{test_image.path}: size {actual} in its header differs from the "
                    f"mapping's {test_shapes[-1]} (height, width); not decoded"
                )
            else:  # decoded as export decodes it, so a broken file fails here
                read_image(test_image.path, max_pixels=max_pixels)

    all_areas = {c: np.concatenate(a) for c, a in areas.items()}
    return {
        "num_train_images": len(items),
        "num_test_images": len(test_shapes),
        "image_size": _size_summary(shapes),
        "test_image_size": _size_summary(test_shapes),
        "instances_per_class": {
            f"class{c}": {"instances": int(len(a)), "images": images_with[c]} for c, a in all_areas.items()
        },
        "instances_per_image": {
            "median": float(np.median(per_image)),
            "mean": float(np.mean(per_image)),
            "max": max(per_image),
        },
        "max_instances_per_image": max(per_image),
        "area_percentiles": {
            f"class{c}": {f"p{p}": (float(np.percentile(a, p)) if len(a) else None) for p in PERCENTILES}
            for c, a in all_areas.items()
        },
        "warnings": warnings,
    }


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text report of ``dataset_stats`` output."""
    lines = [f"train images: {stats['num_train_images']}   test images: {stats['num_test_images']}"]
    for key, title in (("image_size", "train size"), ("test_image_size", "test size")):
        for axis, s in stats[key].items():
            lines.append(f"{title} {axis:>6}: min {s['min']}  median {_cell(s['median'])}  max {s['max']}")
    ipi = stats["instances_per_image"]
    lines.append(
        f"instances per image: median {_cell(ipi['median'])}  mean {ipi['mean']:.1f}  max {ipi['max']}"
    )
    header = ["class", "instances", "images"] + [f"area p{p}" for p in PERCENTILES]
    rows = [
        [name, str(counts["instances"]), str(counts["images"])]
        + [_cell(v) for v in stats["area_percentiles"][name].values()]
        for name, counts in stats["instances_per_class"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["", *("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [header, *rows])]
    lines += ["", *(f"warning: {w}" for w in stats["warnings"])] if stats["warnings"] else []
    return "\n".join(lines)
