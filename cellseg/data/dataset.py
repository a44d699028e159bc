"""The torch Dataset of training samples, the seeded train/validation split and the collate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cellseg.config import DataConfig
from cellseg.data.augment import Transform
from cellseg.data.layout import TrainItem
from cellseg.data.resize import downscale_sample
from cellseg.data.sample import load_sample
from cellseg.data.targets import targets_from_label_maps


class CellDataset(torch.utils.data.Dataset):
    """Training samples as ``(image (3, H, W) float32, target)`` in torchvision MaskRCNN's format.

    ``target`` holds tensors ``boxes``, ``labels`` and ``masks`` plus ``image_id`` (the index).
    With ``cache_decoded`` each sample is decoded once per process and kept (about 28 bytes per
    pixel); transforms must not modify their inputs in place. The transform's generator is seeded
    by ``(seed, epoch, index)``: the same seed gives the same augmentation whatever the worker
    count or order. Call ``set_epoch`` before iterating each epoch; the epoch lives in shared
    memory, so persistent DataLoader workers see it too. ``downscale_to = (min_size, max_size)``
    shrinks each transformed sample to the model's input size before its masks are made
    (``cellseg.data.resize``). ``max_pixels`` and ``max_instances`` are ``load_sample``'s limits.
    """

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        transform: Transform | None = None,
        cache_decoded: bool = True,
        seed: int = 0,
        downscale_to: tuple[int, int] | None = None,
        max_pixels: int = DataConfig.max_pixels,
        max_instances: int = DataConfig.max_instances,
    ) -> None:
        self.items = list(items)
        self.limits = {"max_pixels": max_pixels, "max_instances": max_instances}
        self.downscale_to = downscale_to
        self.transform = transform
        self.cache_decoded = cache_decoded
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        """The items' ids (their folder names), in index order: image id i is ``names[i]``."""
        return [item.item_id for item in self.items]

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of this epoch (in every worker process)."""
        self._epoch.fill_(epoch)

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed image (H, W, 3) and label maps (4, H, W) of one sample."""
        if index in self._cache:
            return self._cache[index]
        sample = load_sample(self.items[index], **self.limits)
        if self.cache_decoded:
            self._cache[index] = sample
        return sample

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} samples")
        image, label_maps = self.decoded(index)
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, label_maps = self.transform(image, label_maps, rng)
        if self.downscale_to is not None:
            image, label_maps = downscale_sample(image, label_maps, *self.downscale_to)
        target = {k: torch.from_numpy(v) for k, v in targets_from_label_maps(label_maps).items()}
        target["image_id"] = index
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


def split_sizes(count: int, val_fraction: float) -> tuple[int, int]:
    """How many of ``count`` items ``split_items`` puts in (train, validation).

    The validation part holds ``round(count * val_fraction)`` items, at least one and leaving at
    least one for training when there are two or more; a single item, or ``val_fraction`` 0, puts
    every item in training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if count < 2 or val_fraction == 0:
        return count, 0
    n_val = min(max(round(count * val_fraction), 1), count - 1)
    return count - n_val, n_val


def split_items(
    items: Sequence[TrainItem], val_fraction: float, seed: int
) -> tuple[list[TrainItem], list[TrainItem]]:
    """A seeded (train, validation) split of items sorted by id (so disk order does not matter),
    of the sizes ``split_sizes`` gives."""
    ordered = sorted(items, key=lambda item: item.item_id)
    _, n_val = split_sizes(len(ordered), val_fraction)
    chosen = set(np.random.default_rng(seed).permutation(len(ordered))[:n_val].tolist())
    train = [item for i, item in enumerate(ordered) if i not in chosen]
    val = [item for i, item in enumerate(ordered) if i in chosen]
    return train, val


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Batch as (list of images, list of targets): detection images differ in size."""
    return [image for image, _ in batch], [target for _, target in batch]
