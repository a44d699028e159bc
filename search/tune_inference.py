"""The inference-settings search (``cellseg tune-inference``, ``search/run.py --tune-inference``).

The chosen run's model predicts the validation split once per test scale and view into a bounded
cache (``cellseg.prediction_cache``); an Optuna study (TPE or a grid) then scores settings on the
cache without running the model again. The result is an MLflow run nested under the search's
parent (the training run itself for a single run), and ``inference.json`` beside the checkpoint,
which ``cellseg export --best`` / ``--run-id`` then predicts with, only when the search's best
beats the model's own settings by ``IMPROVED_RULE`` (a paired bootstrap of the validation images);
otherwise no settings file is beside the checkpoint and export uses the model's own pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna

from cellseg.bootstrap import RESAMPLES, share_at_least
from cellseg.checkpoint import checkpoint_config, file_sha256, load_checkpoint, restore_model
from cellseg.commands import chosen_run, config_on_data
from cellseg.data import dataset_fingerprint
from cellseg.errors import ConfigError, DataError
from cellseg.inference_settings import (
    SETTINGS_FILE,
    CacheSettings,
    InferenceSettings,
    model_settings,
    write_settings,
)
from cellseg.plots import plot_inference_search
from cellseg.prediction_cache import DEFAULT_MAX_BYTES, PredictionCache, build_cache
from cellseg.settings_space import SettingsSpace, grid_values, suggest_settings
from cellseg.tracking import (
    CHECKPOINT_ARTIFACT,
    DEFAULT_EXPERIMENT,
    SOURCE_TAG,
    Tracker,
    best_metric_key,
)
from cellseg.training import build_datasets, resolve_device
from cellseg.tta import DEFAULT_TTA

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "grid")
DEFAULT_SCALES = (1.0, 1.25, 1.5)  # of the trained size; each scale is one more pass per view
DEFAULT_TRIALS = 50  # a trial costs one COCOeval of the validation split, no model pass
DEFAULT_MAX_CACHE_MB = DEFAULT_MAX_BYTES / 2**20  # the real slice at the defaults needs about 500 MiB
# the share of paired bootstrap resamples in which tuned settings must score at least the baseline
IMPROVED_SHARE = 0.95
IMPROVED_RULE = (
    f"improved: above the model's own on the validation split and at least as good in "
    f"{IMPROVED_SHARE:.0%} of {RESAMPLES} paired bootstrap resamples of its images"
)
TUNED_RUN_TAG = "cellseg.tuned_run"  # on the tune-inference run: the run whose settings it tuned
SOURCE = "tune-inference"


def settings_study(
    objective_space: SettingsSpace,
    score: Callable[[InferenceSettings], float],
    *,
    sampler: str,
    trials: int,
    seed: int,
    progress: bool,
) -> optuna.Study:
    """An Optuna study maximising ``score(settings)`` over the space: ``trials`` TPE trials, or
    ``trials`` points of the grid (all of it when smaller), in a seeded random order."""
    if sampler == "grid":
        grid = grid_values(objective_space)
        chosen: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(grid, seed=seed)
        trials = min(trials, _grid_size(grid))
    else:
        chosen = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=chosen)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would drown the bar
    study.optimize(
        lambda trial: score(suggest_settings(trial, objective_space)),
        n_trials=trials,
        show_progress_bar=progress,
    )
    return study


def improvement(
    cache: PredictionCache, tuned: InferenceSettings, baseline: InferenceSettings
) -> tuple[bool, float]:
    """Whether ``tuned`` improves on ``baseline`` by ``IMPROVED_RULE`` on the cache's validation
    images, and the share of paired bootstrap resamples in which it scores at least as high."""
    share = share_at_least(cache.interval(tuned), cache.interval(baseline))
    share = 0.0 if share is None else share  # no resample with ground truth: nothing to improve
    return cache.ap50(tuned) > cache.ap50(baseline) and share >= IMPROVED_SHARE, share


def _grid_size(grid: dict[str, list[Any]]) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def tune_inference(
    tracker: Tracker,
    *,
    experiment: str | None,
    run_id: str | None,
    search: str | None,
    data_root: str | None,
    scratch: Path,
    scales: Sequence[float] = DEFAULT_SCALES,
    flips: Sequence[str] = DEFAULT_TTA,
    sampler: str = "tpe",
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    cache_detections: int | None = None,
    cache_nms_iou: float = CacheSettings.nms_iou,
    max_cache_mb: float = DEFAULT_MAX_CACHE_MB,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune the inference settings of run ``run_id`` (else the best run for ``data_root``, within
    ``search`` if named, in ``experiment``) on its validation split; log them and, when they beat
    the model's own (``IMPROVED_SHARE``), save them beside the checkpoint; return a summary.

    Every check of the request, the data and the cache's bound comes before any prediction, and
    the MLflow run is opened only once the cache is built."""
    if not run_id and not data_root:
        raise ConfigError(
            "tune-inference --best needs --data DIR: the best run is chosen among the runs trained "
            "on that dataset (or pass --run-id RUN)"
        )
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give 1 or more")
    if cache_detections is not None and cache_detections < 1:
        raise ConfigError(f"--cache-detections {cache_detections}: give 1 or more")
    start = time.time()
    experiment = _experiment_of(tracker, run_id, experiment)
    run_id, checkpoint, provenance = chosen_run(
        tracker, run_id=run_id, search=search, experiment=experiment, data_root=data_root, scratch=scratch
    )
    record = tracker.record(run_id)
    state = load_checkpoint(checkpoint)
    cfg = config_on_data(checkpoint_config(state), data_root)
    if cfg.data.val_fraction == 0:
        raise ConfigError(
            f"run {run_id} ({record.name}) was trained on every image (data.val_fraction 0, a refit), "
            "so it has no validation split to tune on; tune its source run: export --refit uses the "
            "source's settings"
        )
    fingerprint = dataset_fingerprint(cfg.data).digest
    if record.fingerprint and fingerprint != record.fingerprint:
        raise DataError(
            f"--data {cfg.data.root}: its fingerprint under the run's split ({fingerprint}) differs "
            f"from the data run {run_id} was trained on ({record.fingerprint}), so its validation "
            "split would not be the run's; pass the run's own dataset folder (or drop --data)"
        )
    cache_settings = CacheSettings(
        nms_iou=cache_nms_iou, detections=cache_detections or 2 * cfg.model.detections_per_img
    )
    space = SettingsSpace(
        cache=cache_settings,
        scales=tuple(scales),
        flips=tuple(flips),
        detections_min=min(SettingsSpace.detections_min, cache_settings.detections),
    )
    baseline = model_settings(cfg.model, cache_settings)
    model, _ = restore_model(state, resolve_device(cfg.train.device))
    _, validation = build_datasets(cfg)
    if not len(validation):
        raise ConfigError(f"run {run_id} has no validation images on {cfg.data.root} to tune on")
    cache = build_cache(
        model,
        validation,
        cache=cache_settings,
        scales=space.scales,
        flips=space.flips,
        max_bytes=int(max_cache_mb * 2**20),
        progress=progress,
    )
    del model
    tune_run = tracker.start_run(
        experiment,
        f"{SOURCE}-{record.name}",
        params={
            "sampler": sampler,
            "trials": trials,
            "seed": seed,
            "scales": ",".join(f"{s:g}" for s in space.scales),
            "tta_flips": ",".join(flips) or "none",
            "max_cache_mb": max_cache_mb,
            "improved_share": IMPROVED_SHARE,
        },
        tags={SOURCE_TAG: SOURCE, TUNED_RUN_TAG: run_id},
        parent_run_id=record.parent_id or record.run_id,
    )
    try:
        before = cache.ap50(baseline)
        study = settings_study(
            space, cache.ap50, sampler=sampler, trials=trials, seed=seed, progress=progress
        )
        found = study.best_trial
        best = suggest_settings(optuna.trial.FixedTrial(found.params), space)
        improved, share = improvement(cache, best, baseline)
        settings = best if improved else baseline
        after = found.value if improved else before
        trained = record.metrics.get(best_metric_key("segm_AP50"))
        values = [t.value for t in study.trials if t.value is not None]
        for number, value in enumerate(values):
            tracker.log_metrics(tune_run, {"trial_segm_AP50": value}, step=number)
        metrics = {
            "val_segm_AP50_before": before,
            "val_segm_AP50_best_trial": found.value,
            "val_segm_AP50_after": after,
            "share_at_least_before": share,
            "improved": float(improved),
            "cache_mib": cache.nbytes / 2**20,
            "wall_s": time.time() - start,
        }
        if trained is not None:
            metrics["val_segm_AP50_trained"] = trained
        tracker.log_metrics(tune_run, metrics, step=0)
        tracker.log_params(tune_run, {f"settings.{k}": v for k, v in settings.params().items()})
        out = scratch / SOURCE
        settings_file = write_settings(
            out / SETTINGS_FILE,
            settings,
            {
                "tuned_run": run_id,
                "tune_inference_run": tune_run,
                "checkpoint_sha256": file_sha256(checkpoint),
                "data_fingerprint": fingerprint,
                "improved": improved,
                "improved_rule": IMPROVED_RULE,
                "share_at_least_before": share,
                "validation_segm_AP50_before": before,
                "validation_segm_AP50_best_trial": found.value,
                "validation_segm_AP50_after": after,
                "sampler": sampler,
                "trials": len(values),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        picture = plot_inference_search(values, before, out / "inference-search.png")
        for path in (settings_file, picture):
            tracker.log_artifact(tune_run, path)
        shipped = f"{CHECKPOINT_ARTIFACT}/{SETTINGS_FILE}"
        if improved:
            tracker.log_artifact(run_id, settings_file, CHECKPOINT_ARTIFACT)
        else:  # export then predicts with the model's own pipeline, not this one on the cache
            tracker.delete_artifact_if_present(run_id, shipped)
    except BaseException as exc:
        tracker.fail_run(tune_run, exc)
        raise
    tracker.end_run(tune_run)
    verdict = f"share of resamples at least the model's own {share:.2f} ({IMPROVED_RULE})"
    return {
        "run_id": run_id,
        "run_name": record.name,
        "search": provenance.get("search"),
        "tune_inference_run": tune_run,
        "validation_images": len(cache.truths),
        "cache_mib": round(cache.nbytes / 2**20, 1),
        "trials": len(values),
        "segm_AP50_before": round(before, 4),
        "segm_AP50_best_trial": round(found.value, 4),
        "segm_AP50_after": round(after, 4),
        "improved": f"{'yes' if improved else 'no'}: {verdict}",
        "settings": settings.describe()
        if improved
        else f"the model's own: the best trial ({best.describe()}) did not beat them",
        "settings_file": f"{shipped} of run {run_id}"
        if improved
        else f"none: export predicts with the model's own settings ({SETTINGS_FILE} of run {tune_run} "
        "records the search)",
    }


def _experiment_of(tracker: Tracker, run_id: str | None, experiment: str | None) -> str:
    """Run ``run_id``'s experiment (where its tuning is logged, under its search); else
    ``experiment`` (default ``cellseg``) for --best. ConfigError for a different --experiment."""
    if not run_id:
        return experiment or DEFAULT_EXPERIMENT
    home = tracker.experiment_name(tracker.record(run_id).run_id)
    if experiment not in (None, home):
        raise ConfigError(
            f"--experiment {experiment}: run {run_id} is in experiment {home!r}, where its tuning is "
            f"logged (under its search); drop --experiment or pass --experiment {home}"
        )
    return home
