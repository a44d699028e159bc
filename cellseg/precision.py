"""Where ``train.amp`` computes in reduced precision, and the autocast context it uses."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from cellseg.config import TrainConfig
from cellseg.torch_private import cpu_computes_bf16


def mixed_precision(device: torch.device) -> bool:
    """Whether ``train.amp`` trains in reduced precision on ``device``: on CUDA, and on a CPU that
    computes bf16 natively (elsewhere a CPU emulates bf16, slower than float32)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())


def training_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the training steps (and a validation loss) of ``cfg`` run under autocast on ``device``."""
    return cfg.amp and mixed_precision(device)


def validation_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether validation predicts in bf16 on ``device``: with ``train.amp_validation`` where
    ``train.amp`` computes in bf16 (a GPU without bf16, whose ``train.amp`` is float16, validates in
    float32, as export always predicts)."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return cfg.amp_validation and training_amp(cfg, device) and bf16


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp`` (float16 on a GPU without bf16), else nothing."""
    if not amp:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast(
            "cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)
