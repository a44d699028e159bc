"""Training batches of one orientation (cellseg/data/batching.py), alone and from build_loaders."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cellseg.config import Config, apply_overrides
from cellseg.data.batching import OrientationBatches
from cellseg.input_scale import model_scale
from cellseg.training import build_loaders


class Shapes(torch.utils.data.Dataset):
    """Blank images of the given (height, width), with their index as image id."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        return torch.zeros(3, *self.shapes[index]), {"image_id": index}


def _wide(image: torch.Tensor) -> bool:
    return image.shape[-1] > image.shape[-2]


def _mixed(batches: list[tuple[list, list]]) -> int:
    return sum(len({_wide(image) for image in images}) > 1 for images, _ in batches)


@settings(max_examples=60, deadline=None)
@given(
    wide=st.lists(st.booleans(), min_size=1, max_size=25),
    batch_size=st.integers(1, 4),
    drop_last=st.booleans(),
)
def test_one_orientation_per_batch_and_the_same_samples(
    wide: list[bool], batch_size: int, drop_last: bool
) -> None:
    samples = DataLoader(Shapes([(4, 6) if w else (6, 4) for w in wide]), batch_size=None)
    batches = list(OrientationBatches(samples, batch_size, drop_last=drop_last))
    assert len(batches) == len(OrientationBatches(samples, batch_size, drop_last=drop_last))
    assert len(batches) == len(DataLoader(range(len(wide)), batch_size=batch_size, drop_last=drop_last))
    sizes = [len(images) for images, _ in batches]
    assert all(size == batch_size for size in sizes[:-1]) and all(0 < size <= batch_size for size in sizes)
    assert _mixed(batches) <= 1  # only from the leftovers of both buckets
    ids = [target["image_id"] for _, targets in batches for target in targets]
    plain = DataLoader(range(len(wide)), batch_size=batch_size, drop_last=drop_last)  # the same order
    assert sorted(ids) == [i for batch in plain for i in batch.tolist()]  # drop_last drops the same


def test_a_bucket_is_yielded_once_full_and_the_leftovers_mixed() -> None:
    tall, wide = (6, 4), (4, 6)
    shapes = [tall, wide, wide, tall, wide, tall, tall, tall]
    batches = list(OrientationBatches(DataLoader(Shapes(shapes), batch_size=None), 2, drop_last=True))
    assert [[t["image_id"] for t in targets] for _, targets in batches] == [[1, 2], [0, 3], [5, 6], [7, 4]]


def _padded_pixels(batches, min_size: int, max_size: int) -> int:
    """What the model computes on: each image scaled to its input size, then each batch padded to
    its tallest and widest image (in multiples of 32)."""
    total = 0
    for images, _ in batches:
        shapes = [
            (int(h * model_scale(h, w, min_size, max_size)), int(w * model_scale(h, w, min_size, max_size)))
            for h, w in (image.shape[-2:] for image in images)
        ]
        total += len(images) * math.prod(32 * math.ceil(max(side) / 32) for side in zip(*shapes))
    return total


def test_train_loader_pads_less_and_trains_the_same_samples(synth_root: Path) -> None:
    cfg = apply_overrides(
        Config(),
        {
            "data.root": str(synth_root),
            "data.val_fraction": 0.0,
            "train.batch_size": 3,
            "augment.rot90_p": 0.5,
        },
    )
    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_by_orientation=False))
    grouped_loader, _, grouped_shuffle = build_loaders(cfg, torch.device("cpu"))
    plain_loader, _, plain_shuffle = build_loaders(plain, torch.device("cpu"))
    assert isinstance(grouped_loader, OrientationBatches) and len(grouped_loader) == len(plain_loader) == 2
    padded = [0, 0]
    for epoch in range(4):  # a shuffle and a rotation draw of each epoch
        for loader, shuffle in ((grouped_loader, grouped_shuffle), (plain_loader, plain_shuffle)):
            shuffle.manual_seed(epoch)
            loader.dataset.set_epoch(epoch)
        grouped, plain_batches = list(grouped_loader), list(plain_loader)
        assert _mixed(grouped) <= 1
        ids = [sorted(t["image_id"] for _, targets in b for t in targets) for b in (grouped, plain_batches)]
        assert ids[0] == ids[1]
        padded[0] += _padded_pixels(grouped, cfg.model.min_size, cfg.model.max_size)
        padded[1] += _padded_pixels(plain_batches, cfg.model.min_size, cfg.model.max_size)
    assert padded[0] < padded[1]
