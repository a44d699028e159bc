"""The pictures of a run directory: metric curves and best-model predictions against truth.

Drawn from what ``fit`` left in the run directory (``last.pt``'s history, ``best.pt``'s config
and the validation predictions it stores, else its model run again), so callers draw them when
they need them: ``cellseg train`` after ``fit``, a Tune trial before its last report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cellseg.checkpoint import BEST, LAST, PICTURES, checkpoint_config, load_checkpoint, restore_model
from cellseg.data import dataset_fingerprint
from cellseg.engine import target_truth
from cellseg.plots import plot_history, plot_predictions
from cellseg.precision import validation_amp
from cellseg.predict import predict_images
from cellseg.stored_predictions import stored_predictions
from cellseg.training import build_datasets


def write_run_pictures(
    run_dir: str | Path, device: torch.device | str = "cpu", *, num_images: int = 3
) -> list[Path]:
    """Write ``pictures/history.png`` and ``pictures/val_<i>.png`` (the best epoch's model on the
    first validation images) under ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    last = load_checkpoint(run_dir / LAST)
    out = run_dir / PICTURES
    paths = [plot_history(last["history"], out / "history.png")]
    state = load_checkpoint(run_dir / BEST) if (run_dir / BEST).is_file() else last
    cfg = checkpoint_config(state)
    _, val_dataset = build_datasets(cfg)
    count = min(num_images, len(val_dataset))
    stored = stored_predictions(state, val_dataset.names, dataset_fingerprint(cfg.data).digest)
    model = restore_model(state, device)[0] if stored is None and count else None
    for index in range(count):
        image, target = val_dataset[index]
        if stored is None:
            amp = validation_amp(cfg.train, torch.device(device))  # as the run validated
            prediction = predict_images(model, [image.to(device)], amp=amp)[0]
        else:
            prediction = stored[index]
        truth = target_truth(target)
        paths.append(
            plot_predictions(image.permute(1, 2, 0).numpy(), truth, prediction, out / f"val_{index}.png")
        )
    return paths
