"""Training batches of one orientation each, so that a batch pads less.

torchvision's detection models pad every image of a batch to the batch's largest height and width
(rounded up to 32). An image wider than tall batched with one taller than wide pads both to about
a square, and the backbone, FPN and RPN compute over the padding. Samples are taken in the
loader's (shuffled) order and go into one of two buckets by their orientation after augmentation
(a rotation or crop changes it); a bucket that holds a batch's worth is yielded, as detectron2
batches. What is left in the buckets at the epoch's end makes mixed batches, so that an epoch has
as many batches, of the same samples, as a plain loader's: with ``drop_last`` only the samples
the plain loader would batch are loaded (docs/performance.md: the padded pixels and the epoch's
time).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from cellseg.data.dataset import collate

Sample = Sequence[Any]  # (image (C, H, W), target), as a list after the loader's default_convert


class OrientationBatches:
    """Batches of ``batch_size`` samples from ``samples`` (a loader of single samples, images
    (C, H, W)), each of images wider than tall or of the others but the mixed ones at the end: one
    with ``drop_last``, which drops the samples a DataLoader's ``drop_last`` drops, else up to
    two, the last one short."""

    def __init__(self, samples: DataLoader, batch_size: int, *, drop_last: bool) -> None:
        if samples.batch_size is not None:
            raise ValueError("OrientationBatches takes a loader of single samples (batch_size=None)")
        self.samples, self.batch_size, self.drop_last = samples, batch_size, drop_last

    @property
    def dataset(self) -> torch.utils.data.Dataset:
        return self.samples.dataset

    def __len__(self) -> int:
        count = len(self.samples)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[list, list]]:
        buckets: tuple[list[Sample], list[Sample]] = ([], [])
        batched = len(self) * self.batch_size if self.drop_last else None
        for sample in itertools.islice(self.samples, batched):
            height, width = sample[0].shape[-2:]
            bucket = buckets[width > height]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                batch = collate(bucket)
                bucket.clear()
                yield batch
        left = buckets[0] + buckets[1]
        for start in range(0, len(left), self.batch_size):
            yield collate(left[start : start + self.batch_size])
