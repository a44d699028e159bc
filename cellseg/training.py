"""fit(): the one training loop, called by ``cellseg train`` and by the search trainable."""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cellseg.checkpoint import BEST, LAST, load_checkpoint, make_state, save_checkpoint
from cellseg.config import Config
from cellseg.data import CellDataset, build_augment, collate, dataset_fingerprint, scan_train, split_items
from cellseg.data.batching import OrientationBatches
from cellseg.engine import Batch, predict_split, split_metrics, train_one_epoch
from cellseg.evaluation import coco_max_dets
from cellseg.model import build_model
from cellseg.optim import LRSchedule, build_optimizer, load_optimizer_state
from cellseg.precision import training_amp, validation_amp
from cellseg.stored_predictions import prediction_state

log = logging.getLogger(__name__)

Report = Callable[[dict[str, float], Path], None]
"""Called after every epoch with the metrics and the run directory holding last.pt and best.pt."""
TrainLoader = DataLoader | OrientationBatches  # data.batch_by_orientation: batches of one orientation

TRAIN_SECONDS = "epoch_train_s"  # wall time of the epoch's training pass
VAL_SECONDS = "epoch_val_s"  # wall time of its validation (0 when the epoch skipped it)


@dataclass
class FitResult:
    run_dir: Path
    best_metric: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(cfg: Config) -> tuple[CellDataset, CellDataset]:
    """Train and validation datasets on the fixed seeded split."""
    items = scan_train(cfg.data.root)
    train_items, val_items = split_items(items, cfg.data.val_fraction, cfg.data.split_seed)
    if cfg.train.max_eval_images:
        val_items = val_items[: cfg.train.max_eval_images]
    limits = dict(max_pixels=cfg.data.max_pixels, max_instances=cfg.data.max_instances)
    train = CellDataset(
        train_items,
        transform=build_augment(cfg.augment),
        cache_decoded=cfg.data.cache_decoded,
        seed=cfg.train.seed,
        downscale_to=(cfg.model.min_size, cfg.model.max_size),
        **limits,
    )
    val = CellDataset(
        val_items, transform=None, cache_decoded=cfg.data.cache_decoded, seed=cfg.train.seed, **limits
    )
    return train, val


def build_loaders(cfg: Config, device: torch.device) -> tuple[TrainLoader, DataLoader, torch.Generator]:
    """Train and validation loaders on the fixed seeded split, and the train shuffle generator.
    With ``data.batch_by_orientation`` each training batch holds images of one orientation."""
    train, val = build_datasets(cfg)
    common = dict(
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    shuffle = torch.Generator()
    batch_size, drop_last = cfg.train.batch_size, len(train) > cfg.train.batch_size
    if cfg.data.batch_by_orientation:
        # prefetch_factor counts samples here: two batches per worker in flight, as with batches
        prefetch = {"prefetch_factor": 2 * batch_size} if cfg.data.num_workers else {}
        samples = DataLoader(train, batch_size=None, shuffle=True, generator=shuffle, **common, **prefetch)
        train_loader = OrientationBatches(samples, batch_size, drop_last=drop_last)
    else:
        train_loader = DataLoader(
            train,
            batch_size=batch_size,
            shuffle=True,
            generator=shuffle,
            drop_last=drop_last,
            collate_fn=collate,
            **common,
        )
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, collate_fn=collate, **common)
    return train_loader, val_loader, shuffle


@dataclass
class Training:
    """What ``fit`` builds before its first epoch (the benchmarks build it the same way)."""

    cfg: Config
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: TrainLoader
    val_loader: DataLoader
    shuffle: torch.Generator
    scaler: torch.amp.GradScaler | None
    amp: bool

    def start_epoch(self, epoch: int) -> None:
        """Seed the shuffle and the augmentation of ``epoch`` (same order however resumed)."""
        self.shuffle.manual_seed(self.cfg.train.seed * 100_003 + epoch)
        self.train_loader.dataset.set_epoch(epoch)

    def train_epoch(
        self, epoch: int, *, loader: Iterable[Batch] | None = None, progress: bool = False
    ) -> dict[str, float]:
        """Seed ``epoch`` and train it over ``loader`` (default the train loader; a wrapper of it
        times it); the epoch's mean losses."""
        self.start_epoch(epoch)
        return train_one_epoch(
            self.model,
            self.optimizer,
            self.schedule,
            self.train_loader if loader is None else loader,
            self.device,
            epoch=epoch,
            scaler=self.scaler,
            amp=self.amp,
            grad_clip=self.cfg.optim.grad_clip,
            progress=progress,
        )


def build_training(cfg: Config) -> Training:
    """Seed, then build loaders, model, optimizer, schedule and gradient scaler for ``cfg``."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_loader, val_loader, shuffle = build_loaders(cfg, device)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    schedule = LRSchedule(optimizer, cfg.optim, epochs=cfg.train.epochs, iters_per_epoch=len(train_loader))
    amp = training_amp(cfg.train, device)
    fp16 = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    return Training(cfg, device, model, optimizer, schedule, train_loader, val_loader, shuffle, scaler, amp)


def fit(
    cfg: Config,
    *,
    run_dir: str | Path,
    report: Report | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``cfg`` for ``cfg.train.epochs``, validating and checkpointing every epoch.

    With ``data.val_fraction`` 0 (a refit on every image) nothing is validated: ``best.pt`` is the
    final epoch's model and the best metric stays ``-inf``.

    ``resume_from`` is a run directory (or its last.pt) written by an earlier call: training
    continues after its last epoch with the same model, optimizer, schedule and history.
    The model's pictures are not drawn here (``cellseg.run_pictures``, from the run directory).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = build_training(cfg)
    model, optimizer, schedule, scaler, device = t.model, t.optimizer, t.schedule, t.scaler, t.device
    log.info("training on %s in %s", device, "mixed precision (train.amp)" if t.amp else "float32")
    history: list[dict[str, float]] = []
    best_metric, best_epoch, start = -math.inf, 0, 1
    if resume_from is not None:
        resume_from = Path(resume_from)
        last_path = resume_from / LAST if resume_from.is_dir() else resume_from
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        history, best_metric, best_epoch = state["history"], state["best_metric"], state["best_epoch"]
        start = state["epoch"] + 1
        if last_path.parent != run_dir:
            for name in (LAST, BEST):
                if (last_path.parent / name).is_file():
                    shutil.copy2(last_path.parent / name, run_dir / name)
        log.info("resumed from %s at epoch %d", last_path, start)
    metric_name = cfg.train.metric
    validated = cfg.data.val_fraction > 0
    val_names = t.val_loader.dataset.names
    data_digest = dataset_fingerprint(cfg.data).digest if validated else ""
    for epoch in range(start, cfg.train.epochs + 1):
        started = time.perf_counter()
        losses = t.train_epoch(epoch, progress=progress)
        trained = time.perf_counter()
        metrics = {"epoch": float(epoch), "lr": schedule.lr, **{f"train_{k}": v for k, v in losses.items()}}
        metrics.update({TRAIN_SECONDS: trained - started, VAL_SECONDS: 0.0})
        if not validated:
            if epoch == cfg.train.epochs:
                best_epoch = epoch
                save_checkpoint(run_dir / BEST, make_state(cfg, model, epoch=epoch, metrics=metrics))
        elif epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            split = predict_split(
                model,
                t.val_loader,
                device,
                amp=t.amp,
                progress=progress,
                with_loss=cfg.train.val_loss,
                predict_amp=validation_amp(cfg.train, device),
            )
            metrics.update(split_metrics(split, max_dets=coco_max_dets(cfg.model.detections_per_img)))
            metrics[VAL_SECONDS] = time.perf_counter() - trained
            if metrics[metric_name] > best_metric:
                best_metric, best_epoch = metrics[metric_name], epoch
                predictions = prediction_state(split.predictions, val_names, data_digest)
                save_checkpoint(  # with the predictions, for the pictures and the intervals
                    run_dir / BEST, make_state(cfg, model, epoch=epoch, metrics=metrics, **predictions)
                )
        schedule.step_epoch(metrics.get(metric_name, best_metric) if validated else None)
        history.append(metrics)
        save_checkpoint(
            run_dir / LAST,
            make_state(
                cfg,
                model,
                epoch=epoch,
                metrics=metrics,
                optimizer=optimizer.state_dict(),
                schedule=schedule.state_dict(),
                scaler=scaler.state_dict() if scaler else None,
                torch_rng=torch.get_rng_state(),
                history=history,
                best_metric=best_metric,
                best_epoch=best_epoch,
            ),
        )
        if report is not None:
            report(metrics, run_dir)
    return FitResult(run_dir=run_dir, best_metric=best_metric, best_epoch=best_epoch, history=history)
