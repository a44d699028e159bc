"""Samples, per-instance targets, the Dataset, the split and the collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import cellseg.data.dataset as dataset_module
from cellseg.data import (
    CellDataset,
    TrainItem,
    collate,
    load_sample,
    scan_train,
    split_items,
    split_sizes,
    targets_from_label_maps,
)


def _ids(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """An id map with rectangles id -> (row0, row1, col0, col1), later ones on top."""
    ids = np.zeros(shape)
    for i, (r0, r1, c0, c1) in boxes.items():
        ids[r0:r1, c0:c1] = i
    return ids


@pytest.fixture
def quirky_root(tmp_path: Path, write_sample) -> Path:
    """Ids > 255 continuing across class files, an absent class, a shared pixel, an empty image."""
    class1 = _ids((10, 12), {1: (0, 2, 0, 3), 7: (5, 10, 8, 12)})
    class2 = _ids((10, 12), {300: (0, 3, 3, 6), 70000: (6, 7, 0, 1)})
    class4 = _ids((10, 12), {70001: (4, 6, 9, 11)})  # shares pixels (4..5, 9..10) with class1's 7
    write_sample(tmp_path, "a", (10, 12), {1: class1, 2: class2, 4: class4})
    write_sample(tmp_path, "empty", (9, 5))
    return tmp_path


def test_load_sample_label_maps(quirky_root: Path) -> None:
    image, label_maps = load_sample(scan_train(quirky_root)[0])
    assert image.shape == (10, 12, 3) and image.dtype == np.float32
    assert label_maps.shape == (4, 10, 12) and label_maps.dtype == np.int32
    assert set(np.unique(label_maps[1])) == {0, 300, 70000}
    assert not label_maps[2].any()  # class3.tif absent
    assert label_maps[0, 5, 9] == 7 and label_maps[3, 5, 9] == 70001  # labelled in both files


def test_targets_order_boxes_and_shared_pixels(quirky_root: Path) -> None:
    _, label_maps = load_sample(scan_train(quirky_root)[0])
    t = targets_from_label_maps(label_maps)
    assert t["labels"].dtype == np.int64 and t["labels"].tolist() == [1, 1, 2, 2, 4]
    assert t["boxes"].dtype == np.float32
    np.testing.assert_array_equal(
        t["boxes"], [[0, 0, 3, 2], [8, 5, 12, 10], [3, 0, 6, 3], [0, 6, 1, 7], [9, 4, 11, 6]]
    )
    assert t["masks"].dtype == np.uint8 and t["masks"].shape == (5, 10, 12)
    assert t["masks"][1, 5, 9] == t["masks"][4, 5, 9] == 1  # both instances keep the pixel
    assert t["masks"].sum(axis=(1, 2)).tolist() == [6, 20, 9, 1, 4]


def test_targets_empty() -> None:
    t = targets_from_label_maps(np.zeros((4, 7, 9), np.int32))
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == np.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == np.int64
    assert t["masks"].shape == (0, 7, 9) and t["masks"].dtype == np.uint8


@settings(max_examples=40, deadline=None)
@given(arrays(np.int32, (4, 6, 7), elements=st.sampled_from([0, 0, 0, 1, 2, 256, 2**31 - 1])))
def test_targets_match_naive(label_maps: np.ndarray) -> None:
    t = targets_from_label_maps(label_maps)
    expected = [(c + 1, i) for c in range(4) for i in np.unique(label_maps[c]) if i]
    assert t["labels"].tolist() == [c for c, _ in expected]
    for k, (c, i) in enumerate(expected):
        mask = label_maps[c - 1] == i
        rows, cols = np.nonzero(mask)
        np.testing.assert_array_equal(t["masks"][k], mask)
        assert t["boxes"][k].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_dataset_items_and_empty_target(quirky_root: Path) -> None:
    ds = CellDataset(scan_train(quirky_root))
    image, target = ds[1]  # "empty": no class files
    assert image.shape == (3, 9, 5) and image.dtype == torch.float32
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, 9, 5) and target["masks"].dtype == torch.uint8
    assert target["image_id"] == 1
    image, target = ds[0]
    assert image.shape == (3, 10, 12) and target["labels"].tolist() == [1, 1, 2, 2, 4]
    with pytest.raises(IndexError):
        ds[2]


def test_cache_decodes_once(quirky_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(item: TrainItem, **limits: int):
        calls.append(item.item_id)
        return load_sample(item, **limits)

    monkeypatch.setattr(dataset_module, "load_sample", counting)
    items = scan_train(quirky_root)
    cached = CellDataset(items, cache_decoded=True)
    for _ in range(3):
        cached[0]
    assert calls == ["a"]
    uncached = CellDataset(items, cache_decoded=False)
    uncached[0], uncached[0]
    assert calls == ["a", "a", "a"]


def _flip(image: np.ndarray, label_maps: np.ndarray, rng: np.random.Generator):
    if rng.random() < 0.5:
        return image[:, ::-1], label_maps[:, :, ::-1]
    return image, label_maps


def test_transform_randomness_reproducible(synth_root: Path) -> None:
    items = scan_train(synth_root)[:3]

    def epoch_outputs(ds: CellDataset, epoch: int) -> list[np.ndarray]:
        ds.set_epoch(epoch)
        return [ds[i][0].numpy() for i in range(len(ds))]

    def flipped_pattern(seed: int, epochs: range) -> list[bool]:
        ds = CellDataset(items, transform=_flip, seed=seed)
        plain = CellDataset(items)
        return [
            not np.array_equal(a, plain[i][0].numpy())
            for e in epochs
            for i, a in enumerate(epoch_outputs(ds, e))
        ]

    a, b = flipped_pattern(0, range(6)), flipped_pattern(0, range(6))
    assert a == b  # same seed, same augmentation
    assert len(set(map(tuple, np.reshape(a, (6, 3))))) > 1  # epochs differ
    assert flipped_pattern(1, range(6)) != a


def test_epoch_reaches_persistent_workers(synth_root: Path) -> None:
    items = scan_train(synth_root)[:2]
    ds = CellDataset(items, transform=_flip, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=1, persistent_workers=True, collate_fn=collate
    )
    expected_per_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        got = [images[0].numpy() for images, _ in loader]
        expected = [ds[i][0].numpy() for i in range(len(ds))]  # main process, same epoch
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        expected_per_epoch.append([e.tobytes() for e in expected])
    assert any(e != expected_per_epoch[0] for e in expected_per_epoch)  # the check had teeth


def test_transformed_targets_follow(quirky_root: Path) -> None:
    ds = CellDataset(scan_train(quirky_root), transform=lambda im, lm, rng: (im[:, ::-1], lm[:, :, ::-1]))
    _, target = ds[0]
    assert target["boxes"][0].tolist() == [9, 0, 12, 2]  # x range 0..3 mirrored in width 12


def test_loader_with_collate(quirky_root: Path) -> None:
    loader = torch.utils.data.DataLoader(
        CellDataset(scan_train(quirky_root)), batch_size=2, collate_fn=collate
    )
    images, targets = next(iter(loader))
    assert [i.shape for i in images] == [(3, 10, 12), (3, 9, 5)]
    assert [t["image_id"] for t in targets] == [0, 1]


def test_maskrcnn_accepts_targets(quirky_root: Path) -> None:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=5, min_size=64, max_size=64)
    images, targets = collate([CellDataset(scan_train(quirky_root))[i] for i in (0, 1)])
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def _items(n: int) -> list[TrainItem]:
    return [
        TrainItem(f"id{i:03d}", Path(f"/d/id{i:03d}"), Path(f"/d/id{i:03d}/image.tif"), {}) for i in range(n)
    ]


def test_split_deterministic_and_order_free() -> None:
    items = _items(40)
    train, val = split_items(items, 0.15, seed=0)
    assert len(val) == 6 and len(train) == 34
    assert {i.item_id for i in train}.isdisjoint(i.item_id for i in val)
    assert split_items(items[::-1], 0.15, seed=0) == (train, val)
    assert split_items(items, 0.15, seed=1)[1] != val


@pytest.mark.parametrize("n, fraction", [(2, 0.15), (2, 0.9), (3, 0.01), (5, 0.99)])
def test_split_keeps_both_parts(n: int, fraction: float) -> None:
    train, val = split_items(_items(n), fraction, seed=0)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n


def test_split_edge_cases() -> None:
    assert split_items(_items(1), 0.5, seed=0) == (_items(1), [])
    assert split_items(_items(4)[::-1], 0.0, seed=0) == (_items(4), [])  # every item trains
    assert split_sizes(209, 0.15) == (178, 31) and split_sizes(209, 0.0) == (209, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_items(_items(4), 1.0, seed=0)
