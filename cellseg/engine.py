"""The two steps of the training loop, as free functions returning flat dicts of floats."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from cellseg.evaluation import ImagePrediction, ImageTruth, coco_metrics, truth_from_masks
from cellseg.optim import LRSchedule
from cellseg.precision import autocast
from cellseg.predict import predict_images


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message holds every loss term."""


Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    grad_clip: float = 0.0,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term and of their sum (``loss``)."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for images, targets in bar:
        images, targets = _to_device((images, targets), device)
        with autocast(device, amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {steps + 1}: {values}; "
                "lower optim.lr, enable optim.grad_clip or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], grad_clip
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        schedule.step_iteration()
        steps += 1
        for k, v in values.items():
            sums[k] += v
        sums["loss"] += sum(values.values())
        bar.set_postfix(loss=f"{sum(values.values()):.3f}", lr=f"{schedule.lr:.2e}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


def _loss_mode(model: nn.Module) -> None:
    """Training mode (the only mode in which torchvision returns losses) with frozen norm stats."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@dataclass
class SplitPredictions:
    """A model's predictions on a loader's images, their ground truth, and the mean loss if asked."""

    truths: list[ImageTruth]
    predictions: dict[int, ImagePrediction]
    loss: float | None = None


def target_truth(target: dict[str, torch.Tensor]) -> ImageTruth:
    """The ground truth of one dataset target (its ``image_id``, masks and labels)."""
    return truth_from_masks(
        int(target["image_id"]), target["masks"].cpu().numpy(), target["labels"].cpu().numpy()
    )


@torch.no_grad()
def predict_split(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    progress: bool = True,
    amp: bool = False,
    with_loss: bool = False,
    predict_amp: bool = False,
) -> SplitPredictions:
    """Predict every image of ``loader`` (by image id) with its ground truth, in reduced precision
    with ``predict_amp`` (``train.amp_validation``); the mean loss too if asked (in reduced
    precision with ``amp``), which needs a second forward pass in training mode (the only mode in
    which torchvision returns losses), about a fifth of the time with hundreds of detections per
    image."""
    truths, predictions = [], {}
    loss_sum, batches = 0.0, 0
    for images, targets in tqdm(loader, desc="validate", leave=False, disable=not progress):
        images, targets = _to_device((images, targets), device)
        if with_loss:
            _loss_mode(model)
            with autocast(device, amp):
                loss_sum += float(sum(model(images, targets).values()))
            batches += 1
        model.eval()
        for target, prediction in zip(targets, predict_images(model, images, amp=predict_amp)):
            truths.append(target_truth(target))
            predictions[int(target["image_id"])] = prediction
    return SplitPredictions(truths, predictions, loss_sum / max(batches, 1) if with_loss else None)


def split_metrics(split: SplitPredictions, *, max_dets: int) -> dict[str, float]:
    """COCO metrics (segm_AP50, segm_AP, bbox_AP50, per class) of a split, and ``val_loss`` if it has one."""
    metrics = coco_metrics(split.truths, split.predictions, max_dets=max_dets)
    if split.loss is not None:
        metrics["val_loss"] = split.loss
    return metrics


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    max_dets: int,
    progress: bool = True,
    amp: bool = False,
    with_loss: bool = False,
    predict_amp: bool = False,
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``loader`` (see ``split_metrics``), and ``val_loss`` if asked."""
    split = predict_split(
        model, loader, device, progress=progress, amp=amp, with_loss=with_loss, predict_amp=predict_amp
    )
    return split_metrics(split, max_dets=max_dets)
