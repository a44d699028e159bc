"""The synthetic generator: determinism, exact real formats and every data quirk present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.measure import label

from cellseg.data import (
    ground_truth_maps,
    load_sample,
    load_test_images,
    make_synthetic_dataset,
    read_image,
    scan_train,
)
from cellseg.data.layout import MAPPING_FILE
from cellseg.errors import DataError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def samples(synth_root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [load_sample(item) for item in scan_train(synth_root)]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = (
        make_synthetic_dataset(tmp_path / n, 4, 2, seed=s, max_side=160)
        for n, s in (("a", 5), ("b", 5), ("c", 6))
    )
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    assert sorted(_files(a)) != sorted(_files(c))  # uuids come from the seed too


def test_file_formats_match_real_data(synth_root: Path) -> None:
    item = next(i for i in scan_train(synth_root) if i.class_paths)
    with tifffile.TiffFile(item.image_path) as tif:
        page = tif.pages[0]
        assert page.dtype == np.uint8 and page.shape[2] == 4
        assert page.compression == tifffile.COMPRESSION.LZW
        assert (page.asarray()[..., 3] == 255).all()
    for path in item.class_paths.values():
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            assert page.dtype == np.float64 and page.ndim == 2
            assert page.compression == tifffile.COMPRESSION.NONE
    test_image = load_test_images(synth_root)[0]
    with tifffile.TiffFile(test_image.path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW and tif.pages[0].shape[2] == 4


def test_layout_readable(synth_root: Path, samples) -> None:
    assert len(samples) == 8
    test_images = load_test_images(synth_root)
    truth = {t.file_name: ground_truth_maps(synth_root, t) for t in test_images}
    assert len(test_images) == len(truth) == 4
    for t in test_images:
        assert read_image(t.path).shape == (t.height, t.width, 3)
        assert truth[t.file_name].shape == (4, t.height, t.width)
    assert any(m.any() for m in truth.values())


def test_ids_large_gapped_and_continuing_across_classes(samples) -> None:
    ids_per_image = [[np.unique(m[m > 0]) for m in lm] for _, lm in samples]
    assert any(ids.max() > 255 for image in ids_per_image for ids in image if len(ids))
    all_ids = [np.concatenate(image) for image in ids_per_image]
    assert any(len(ids) and ids.max() > len(ids) for ids in all_ids)  # gaps
    for image in ids_per_image:
        present = [ids for ids in image if len(ids)]
        for earlier, later in zip(present, present[1:]):
            assert earlier.max() < later.min()


def test_quirks_present(synth_root: Path, samples) -> None:
    items = scan_train(synth_root)
    assert any(not i.class_paths for i in items)  # an image without cells
    assert any(0 < len(i.class_paths) < 4 for i in items)  # absent class files
    assert any(((lm > 0).sum(0) > 1).any() for _, lm in samples)  # pixels in two class files
    instances = [sum(len(np.unique(m)) - 1 for m in lm) for _, lm in samples]
    pieces = [sum(label(m > 0).max() for m in lm) for _, lm in samples]
    assert any(n > 200 and p < n / 2 for n, p in zip(instances, pieces))  # touching cells
    assert min(min(image.shape[:2]) for image, _ in samples) < 64


def test_test_mapping(synth_root: Path) -> None:
    mapping = json.loads((synth_root / MAPPING_FILE).read_text())
    ids = [e["id"] for e in mapping]
    assert min(ids) == 1 and len(set(ids)) == 4 and 2 not in ids
    shapes = {(e["height"], e["width"]) for e in mapping}
    assert (33, 35) in shapes
    assert any(w >= 3 * h and w == 400 for h, w in shapes)


def test_default_sizes_span_tiny_to_large(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", 2, 0, seed=0)
    shapes = [read_image(i.image_path).shape[:2] for i in scan_train(root)]
    assert min(min(s) for s in shapes) < 64 and max(max(s) for s in shapes) > 1500


def test_easy_profile(easy_root: Path) -> None:
    samples = [load_sample(item) for item in scan_train(easy_root)]
    assert len(samples) == 24
    classes = set()
    for image, lm in samples:
        assert 64 <= min(image.shape[:2]) and max(image.shape[:2]) <= 160
        assert 1 <= sum(len(np.unique(m)) - 1 for m in lm) <= 12  # cells that do not fit: left out
        assert ((lm > 0).sum(0) <= 1).all()
        classes |= {c for c in range(4) if lm[c].any()}
    assert classes == {0, 1, 2, 3}


def test_medium_profile_has_easy_sizes_but_touching_cells(tmp_path: Path) -> None:
    """The demo's data: images as small as easy's (the same cost per image), more cells, and cells
    that touch (a pixel of one instance next to another's) or are cut by others."""
    root = make_synthetic_dataset(tmp_path / "m", 20, 2, seed=0, profile="medium")
    samples = [load_sample(item) for item in scan_train(root)]
    counts, touching, classes = [], 0, set()
    for image, lm in samples:
        assert 64 <= min(image.shape[:2]) and max(image.shape[:2]) <= 160
        counts.append(sum(len(np.unique(m)) - 1 for m in lm))
        ids = lm.max(0)  # one id per pixel (ids are unique across class files)
        right, down = (ids[:, 1:], ids[:, :-1]), (ids[1:], ids[:-1])
        touching += any(((a > 0) & (b > 0) & (a != b)).any() for a, b in (right, down))
        classes |= {c for c in range(4) if lm[c].any()}
    assert max(counts) > 12 and np.mean(counts) > 6  # more than easy's 2-12
    assert touching >= len(samples) // 2
    assert classes == {0, 1, 2, 3}


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="realistic, easy, medium"):
        make_synthetic_dataset(tmp_path / "x", 1, 1, seed=0, profile="hard")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(DataError, match="folder not empty"):
        make_synthetic_dataset(tmp_path / "full", 1, 1, seed=0)
