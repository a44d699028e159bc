"""The plain baseline: a typical student / torchvision-references Mask R-CNN data path and loop.

Every ``__getitem__`` decodes ``image.tif`` and each ``classN.tif`` with tifffile and builds one
full-size uint8 mask per instance with a Python loop over ``np.unique`` ids; nothing is cached,
the loader has no workers and the loop has no AMP, schedule or gradient clipping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 4

Target = dict[str, torch.Tensor]


class PlainDataset(Dataset):
    """``(image (3, H, W) float32, target)`` decoded from disk on every access, random flips."""

    def __init__(self, folders: Sequence[Path], *, hflip_p: float = 0.5, vflip_p: float = 0.5) -> None:
        self.folders = list(folders)
        self.hflip_p, self.vflip_p = hflip_p, vflip_p

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        folder = self.folders[index]
        rgb = tifffile.imread(folder / "image.tif")
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        image = torch.from_numpy(rgb[:, :, :3].astype(np.float32) / 255.0).permute(2, 0, 1)
        height, width = image.shape[1:]
        masks, boxes, labels = [], [], []
        for c in range(1, NUM_CLASSES + 1):
            path = folder / f"class{c}.tif"
            if not path.exists():
                continue
            ids = tifffile.imread(path)
            for instance in np.unique(ids):
                if instance == 0:
                    continue
                mask = (ids == instance).astype(np.uint8)
                ys, xs = np.where(mask)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                masks.append(mask)
                labels.append(c)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)),
        }
        if torch.rand(1).item() < self.hflip_p:
            image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
            target["boxes"][:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        if torch.rand(1).item() < self.vflip_p:
            image, target["masks"] = image.flip(-2), target["masks"].flip(-2)
            target["boxes"][:, [1, 3]] = height - target["boxes"][:, [3, 1]]
        return image, target


def plain_collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[tuple, tuple]:
    return tuple(zip(*batch))  # type: ignore[return-value]


def plain_loader(
    folders: Sequence[Path], batch_size: int, *, hflip_p: float, vflip_p: float, seed: int = 0
) -> DataLoader:
    """Shuffled, single-process loader; drops the last batch under the same rule as cellseg."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        PlainDataset(folders, hflip_p=hflip_p, vflip_p=vflip_p),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=0,
        collate_fn=plain_collate,
        drop_last=len(folders) > batch_size,
    )


def plain_train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[Sequence[torch.Tensor], Sequence[Target]]],
    device: torch.device,
) -> float:
    """One epoch of ``model(images, targets)``, ``backward``, ``step``; returns the last loss."""
    model.train()
    loss_value = float("nan")
    for images, targets in loader:
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss_dict: dict[str, Any] = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
    return loss_value
