"""The pictures of a finished run: metric curves and best-model predictions against truth."""
from __future__ import annotations

from pathlib import Path

import torch

from cellseg.checkpoint import BEST, PICTURES, load_checkpoint
from cellseg.evaluation import truth_from_masks
from cellseg.plots import plot_history, plot_predictions
from cellseg.predict import predict_images


def write_run_pictures(run_dir: Path, history: list[dict[str, float]], model: torch.nn.Module,
                       val_dataset: torch.utils.data.Dataset, device: torch.device,
                       *, num_images: int = 3) -> list[Path]:
    """Write ``pictures/history.png`` and ``pictures/val_<i>.png`` under ``run_dir``."""
    out = Path(run_dir) / PICTURES
    paths = [plot_history(history, out / "history.png")]
    if (Path(run_dir) / BEST).is_file():
        model.load_state_dict(load_checkpoint(Path(run_dir) / BEST)["model"])
    model.eval()
    for index in range(min(num_images, len(val_dataset))):
        image, target = val_dataset[index]
        prediction = predict_images(model, [image.to(device)])[0]
        truth = truth_from_masks(index, target["masks"].numpy(), target["labels"].numpy())
        paths.append(plot_predictions(image.permute(1, 2, 0).numpy(), truth, prediction,
                                      out / f"val_{index}.png"))
    return paths
