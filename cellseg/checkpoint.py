"""Checkpoints: atomic save, safe load, and the model rebuilt from the config stored inside.

A run directory holds ``last.pt`` (model, optimizer, schedule, scaler, epoch, history: resumes
exactly), ``best.pt`` (model weights, config and metrics of the best epoch: what export needs;
with that epoch's validation predictions, cellseg.stored_predictions)
and ``pictures/`` (curves and predictions of the finished run).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from cellseg.atomic_file import write_atomic
from cellseg.config import Config, config_from_dict, config_to_dict
from cellseg.errors import DataError
from cellseg.model import build_model
from cellseg.weights import load_weights_only

LAST = "last.pt"
BEST = "best.pt"
PICTURES = "pictures"


class CheckpointError(DataError):
    """A checkpoint file that is missing, truncated or not one of ours."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write never leaves a corrupt file.

    Without the CRC-32 that ``torch.save`` writes per record by default: ``torch.load`` never
    checks it (a flipped byte loads silently with or without it), and computing it took a third
    of the time of writing a trial's ``last.pt`` (``bench/checkpoint_save.py``).
    Zip tools that test CRCs (``unzip -t``) report the records of these files as bad.
    """
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        return write_atomic(path, lambda file: torch.save(state, file))
    finally:
        torch.serialization.set_crc32_options(crc)


def make_state(
    cfg: Config, model: torch.nn.Module, *, epoch: int, metrics: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """The checkpoint dictionary: plain types and tensors only, so weights_only loading works."""
    return {
        "config": config_to_dict(cfg),
        "model": model.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
        **extra,
    }


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (a checkpoint), read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True`` (cellseg.weights); clear errors for bad
    files."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST if (path / BEST).is_file() else path / LAST
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = load_weights_only(path, error=CheckpointError, what="a readable cellseg checkpoint")
    if not isinstance(state, dict) or not {"config", "model", "epoch"} <= state.keys():
        raise CheckpointError(f"{path}: not a cellseg checkpoint (keys config/model/epoch missing)")
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The config that produced a checkpoint."""
    return config_from_dict(state["config"], where="checkpoint config: ")


def restore_model(state: dict[str, Any], device: torch.device | str) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint, in eval mode on ``device`` (no pretrained weights loaded)."""
    cfg = checkpoint_config(state)
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg
