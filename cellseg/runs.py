"""What the CLI commands do: train with MLflow tracking, evaluate, export and score."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from cellseg.checkpoint import BEST, checkpoint_config, load_checkpoint
from cellseg.config import Config, flatten
from cellseg.data import (
    check_test_image,
    load_test_images,
    read_image,
    targets_from_label_maps,
    test_truth,
)
from cellseg.engine import evaluate
from cellseg.evaluation import coco_max_dets, score_results_file, truth_from_masks
from cellseg.export import export_predictions, write_submission
from cellseg.model import build_model
from cellseg.plots import plot_class_distribution
from cellseg.tracking import CHECKPOINT_ARTIFACT, RUN_DIR_TAG, Tracker
from cellseg.training import FitResult, build_loaders, fit, resolve_device


def train_and_track(cfg: Config, *, name: str, experiment: str, tracking_uri: str | None,
                    resume_from: str | None, config_path: Path, progress: bool) -> FitResult:
    """``fit`` with an MLflow run: params, per-epoch metrics, best checkpoint and pictures."""
    tracker = Tracker(tracking_uri)
    tracker.check()
    run_dir = Path(resume_from or Path(cfg.train.output_dir) / name).resolve()
    previous = tracker.find_runs(experiment, f"tags.`{RUN_DIR_TAG}` = '{run_dir}'") if resume_from else []
    if previous:
        run_id = previous[0].info.run_id
        tracker.client.update_run(run_id, status="RUNNING")
    else:
        run_id = tracker.start_run(experiment, name, params=flatten(cfg),
                                   tags={RUN_DIR_TAG: str(run_dir), "cellseg.source": "train",
                                         "cellseg.config_file": str(config_path)})
    try:
        result = fit(cfg, run_dir=run_dir, resume_from=resume_from, progress=progress,
                     report=lambda m, _: tracker.log_metrics(run_id, m, step=int(m["epoch"])))
    except BaseException as exc:
        tracker.fail_run(run_id, exc)
        raise
    tracker.finish_run(run_id, run_dir, cfg, result.best_metric)
    print(f"MLflow run {run_id} in {tracker.uri}")
    return result


def restore_model(state: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint, in eval mode on ``device`` (no pretrained weights loaded)."""
    cfg = checkpoint_config(state)
    model = build_model(dataclasses.replace(cfg.model, weights="none"))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def evaluate_checkpoint(checkpoint: str | Path, *, data_root: str | None,
                        progress: bool) -> dict[str, float]:
    """The validation metrics of a checkpoint on the split its config defines."""
    state = load_checkpoint(checkpoint)
    cfg = checkpoint_config(state)
    if data_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(data_root).resolve())))
    device = resolve_device(cfg.train.device)
    model, _ = restore_model(state, device)
    _, val_loader, _ = build_loaders(cfg, device)
    return evaluate(model, val_loader, device, progress=progress,
                    max_dets=coco_max_dets(cfg.model.detections_per_img), with_loss=True)


def export_run(*, checkpoint: str | None, run_id: str | None, best: bool, experiment: str,
               tracking_uri: str | None, data_root: str | None, output: Path,
               zip_path: Path | None, score_threshold: float, scratch: Path,
               progress: bool) -> dict[str, Any]:
    """Predict every test image with a checkpoint (a file, an MLflow run, or the best run)."""
    tracker = None
    if checkpoint is None:
        tracker = Tracker(tracking_uri)
        tracker.check()
        if best:
            run_id = tracker.best_run(experiment).info.run_id
        checkpoint = tracker.download(run_id, f"{CHECKPOINT_ARTIFACT}/{BEST}", scratch)
    state = load_checkpoint(checkpoint)
    device = resolve_device(checkpoint_config(state).train.device)
    model, cfg = restore_model(state, device)
    root = data_root or cfg.data.root
    test_images = load_test_images(root)
    for test_image in test_images:  # every header, before any image is decoded
        check_test_image(test_image, max_pixels=cfg.data.max_pixels)
    results = export_predictions(model, test_images,
                                 functools.partial(read_image, max_pixels=cfg.data.max_pixels),
                                 device=device, score_threshold=score_threshold, progress=progress)
    write_submission(results, test_images, output, zip_path=zip_path)
    picture = plot_class_distribution(results, output.with_name(f"{output.stem}-classes.png"))
    if tracker is not None:
        for path in (output, picture):
            tracker.log_artifact(run_id, path, "export")
    return {"results": output, "zip": zip_path, "picture": picture, "checkpoint": checkpoint,
            "run_id": run_id, "images": len(test_images), "detections": len(results)}


def score_export(results: Path, data_root: Path) -> dict[str, float]:
    """Score a test-results.json against a synthetic dataset's ``test_ground_truth/``."""
    truths = []
    for test_image in load_test_images(data_root):
        target = targets_from_label_maps(test_truth(data_root, test_image))
        truths.append(truth_from_masks(test_image.image_id, target["masks"], target["labels"]))
    return score_results_file(results, truths)
