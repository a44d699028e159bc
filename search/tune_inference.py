"""The inference-settings search (``cellseg tune-inference``, ``search/run.py --tune-inference``).

The chosen run's model (with ``ensemble`` K, the K best runs' models, which must share one
validation split) predicts the validation split once per test scale and view into a bounded cache
(``cellseg.prediction_cache``); an Optuna study (TPE or a grid) then scores settings, the set of
merged scales and the ensemble size among them, on the cache without running a model again. The
result is an MLflow run nested under the search's parent (the training run itself for a single
run), and ``inference.json`` (``inference-ensemble<K>.json``) beside the best run's checkpoint,
which ``cellseg export --best`` / ``--run-id`` (``--best --ensemble K``) then predicts with. The
settings are only replaced when the search beats the best model's own settings on the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna

from cellseg.checkpoint import BEST, checkpoint_config, load_checkpoint, restore_model
from cellseg.commands import Member, best_checkpoints, chosen_run, config_on_data
from cellseg.config import DataConfig
from cellseg.errors import ConfigError
from cellseg.inference_settings import CacheSettings, InferenceSettings, settings_file_name, write_settings
from cellseg.plots import plot_inference_search
from cellseg.prediction_cache import build_cache
from cellseg.settings_space import SettingsSpace, grid_values, suggest_settings
from cellseg.tracking import CHECKPOINT_ARTIFACT, RUN_DIR_TAG, SOURCE_TAG, RunRecord, Tracker, best_metric_key
from cellseg.training import build_datasets, resolve_device
from cellseg.tta import DEFAULT_TTA

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "grid")
DEFAULT_SCALES = (1.0, 1.25, 1.5)  # of the trained size; each scale is one more pass per view
DEFAULT_TRIALS = 50  # a trial costs one COCOeval of the validation split, no model pass
DEFAULT_MAX_CACHE_MB = 2048  # the real slice at the defaults needs about 500 MiB
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
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if trials < 1:
        raise ConfigError(f"--trials {trials}: give 1 or more")
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


def _grid_size(grid: dict[str, list[Any]]) -> int:
    size = 1
    for values in grid.values():
        size *= len(values)
    return size


def tune_inference(
    tracker: Tracker,
    *,
    experiment: str,
    run_id: str | None,
    search: str | None,
    data_root: str | None,
    scratch: Path,
    scales: Sequence[float] = DEFAULT_SCALES,
    flips: Sequence[str] = DEFAULT_TTA,
    ensemble: int = 1,
    sampler: str = "tpe",
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    cache_detections: int | None = None,
    cache_nms_iou: float = CacheSettings.nms_iou,
    max_cache_mb: float = DEFAULT_MAX_CACHE_MB,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune the inference settings of run ``run_id`` (else the best run for ``data_root``, within
    ``search`` if named; with ``ensemble`` K above 1, of the K best runs' ensemble, its size
    searched from 1 to K) on its validation split; log and save them; return a summary."""
    if not run_id and not data_root:
        raise ConfigError(
            "tune-inference --best needs --data DIR: the best run is chosen among the runs trained "
            "on that dataset (or pass --run-id RUN)"
        )
    if ensemble < 1 or (ensemble > 1 and run_id):
        raise ConfigError(
            f"--ensemble {ensemble}: give the number of best runs to merge (1 or more), with --best"
        )
    start = time.time()
    members: list[Member] = (
        best_checkpoints(tracker, experiment, search, data_root, scratch, ensemble)
        if ensemble > 1
        else [
            chosen_run(
                tracker,
                run_id=run_id,
                search=search,
                experiment=experiment,
                data_root=data_root,
                scratch=scratch,
            )
        ]
    )
    records = [tracker.record(str(member[0])) for member in members]
    _check_one_split(records)
    run_id, record, provenance = records[0].run_id, records[0], members[0][2]
    states = [load_checkpoint(member[1]) for member in members]
    cfg = config_on_data(checkpoint_config(states[0]), data_root)
    cache_settings = CacheSettings(
        nms_iou=cache_nms_iou, detections=cache_detections or 2 * cfg.model.detections_per_img
    )
    space = SettingsSpace(
        cache=cache_settings,
        scales=tuple(scales),
        flips=tuple(flips),
        models=ensemble,
        detections_min=min(SettingsSpace.detections_min, cache_settings.detections),
    )
    baseline = InferenceSettings(
        score_threshold=cfg.model.box_score_thresh,
        nms_iou=min(cfg.model.box_nms_thresh, cache_settings.nms_iou),
        detections=min(cfg.model.detections_per_img, cache_settings.detections),
        cache=cache_settings,
    )
    member_ids = [r.run_id for r in records]
    tune_run = tracker.start_run(
        experiment,
        f"{SOURCE}-{record.name}" + (f"-ensemble{ensemble}" if ensemble > 1 else ""),
        params={
            "sampler": sampler,
            "trials": trials,
            "seed": seed,
            "scales": ",".join(f"{s:g}" for s in scales),
            "tta_flips": ",".join(flips) or "none",
            "max_cache_mb": max_cache_mb,
            "ensemble": ensemble,
            "members": ",".join(member_ids),
            "member_names": ",".join(r.name for r in records),
        },
        tags={SOURCE_TAG: SOURCE, TUNED_RUN_TAG: run_id},
        parent_run_id=record.parent_id or record.run_id,
    )
    try:
        device = resolve_device(cfg.train.device)
        models = [restore_model(state, device)[0] for state in states]
        del states
        _, validation = build_datasets(cfg)
        if not len(validation):
            raise ConfigError(f"run {run_id} has no validation images on {cfg.data.root} to tune on")
        cache = build_cache(
            models,
            validation,
            cache=cache_settings,
            scales=space.scales,
            flips=space.flips,
            max_bytes=int(max_cache_mb * 2**20),
            progress=progress,
        )
        del models
        before = cache.ap50(baseline)
        study = settings_study(
            space, cache.ap50, sampler=sampler, trials=trials, seed=seed, progress=progress
        )
        found = study.best_trial
        improved = found.value > before
        best = suggest_settings(optuna.trial.FixedTrial(found.params), space)
        settings = best if improved else baseline
        after = max(found.value, before)
        trained = record.metrics.get(best_metric_key("segm_AP50"))
        values = [t.value for t in study.trials if t.value is not None]
        for number, value in enumerate(values):
            tracker.log_metrics(tune_run, {"trial_segm_AP50": value}, step=number)
        metrics = {
            "val_segm_AP50_before": before,
            "val_segm_AP50_after": after,
            "cache_mib": cache.nbytes / 2**20,
            "wall_s": time.time() - start,
        }
        sizes = _by_ensemble_size(study, best, cache.ap50, ensemble) if ensemble > 1 else {}
        by_size = {  # with an ensemble: the single best against each ensemble size
            **({"val_segm_AP50_single": max(before, sizes.pop(1))} if sizes else {}),
            **{f"val_segm_AP50_ensemble_{k}": v for k, v in sizes.items()},
        }
        metrics.update(by_size)
        if trained is not None:
            metrics["val_segm_AP50_trained"] = trained
        tracker.log_metrics(tune_run, metrics, step=0)
        tracker.log_params(tune_run, {f"settings.{k}": v for k, v in settings.params().items()})
        out = scratch / SOURCE
        settings_file = write_settings(
            out / settings_file_name(ensemble),
            settings,
            {
                "tuned_run": run_id,
                "members": member_ids,
                "member_names": [r.name for r in records],
                "tune_inference_run": tune_run,
                "improved": improved,
                "validation_segm_AP50_before": before,
                "validation_segm_AP50_after": after,
                **by_size,
                "sampler": sampler,
                "trials": len(values),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        picture = plot_inference_search(values, before, out / "inference-search.png")
        for path in (settings_file, picture):
            tracker.log_artifact(tune_run, path)
        tracker.log_artifact(run_id, settings_file, CHECKPOINT_ARTIFACT)
        beside = _local_copy(record.tags.get(RUN_DIR_TAG), settings_file)
    except BaseException as exc:
        tracker.fail_run(tune_run, exc)
        raise
    tracker.end_run(tune_run)
    return {
        "run_id": run_id,
        "run_name": record.name,
        "search": provenance.get("search"),
        **({"members": ", ".join(f"{r.run_id} ({r.name})" for r in records)} if ensemble > 1 else {}),
        "tune_inference_run": tune_run,
        "validation_images": len(cache.truths),
        "cache_mib": round(cache.nbytes / 2**20, 1),
        "trials": len(values),
        "segm_AP50_before": round(before, 4),
        "segm_AP50_after": round(after, 4),
        **{k.removeprefix("val_"): round(v, 4) for k, v in by_size.items()},
        "settings": settings.describe()
        if improved
        else f"the model's own, not beaten ({settings.describe()})",
        "settings_file": f"{CHECKPOINT_ARTIFACT}/{settings_file.name} of run {run_id}"
        + (f" and {beside}" if beside else ""),
    }


def _check_one_split(records: list[RunRecord]) -> None:
    """ConfigError naming the runs when an ensemble's members validated on different splits
    (``data.val_fraction``, ``data.split_seed`` or the dataset fingerprint differ): the cache
    scores every member on the first one's validation images."""

    def split(record: RunRecord) -> tuple[str, str, str | None]:
        return (
            record.params.get("data.val_fraction", str(DataConfig.val_fraction)),
            record.params.get("data.split_seed", str(DataConfig.split_seed)),
            record.fingerprint,
        )

    if len({split(r) for r in records}) > 1:
        listing = "; ".join(
            f"{r.run_id} ({r.name}): val_fraction {v}, split_seed {s}, fingerprint {f}"
            for r, (v, s, f) in zip(records, map(split, records))
        )
        raise ConfigError(
            f"--ensemble {len(records)}: the best runs validated on different splits, so one "
            f"validation cache cannot score them together: {listing}. Pass --search NAME for a "
            "search whose trials share data.val_fraction and data.split_seed, or a smaller --ensemble"
        )


def _by_ensemble_size(
    study: optuna.Study, best: InferenceSettings, score: Callable[[InferenceSettings], float], ensemble: int
) -> dict[int, float]:
    """Validation AP50 per ensemble size 1..``ensemble``: the best of the trials that merged that
    many members, or, for a size no trial tried, the best settings with that many members."""
    found: dict[int, float] = {}
    for trial in study.trials:
        if trial.value is not None:
            size = int(trial.params.get("models", 1))
            found[size] = max(found.get(size, trial.value), trial.value)
    return {
        size: found[size] if size in found else score(dataclasses.replace(best, models=size))
        for size in range(1, ensemble + 1)
    }


def _local_copy(run_dir: str | None, settings_file: Path) -> Path | None:
    """A copy of the settings file in a training run's own directory, when it holds best.pt."""
    if not run_dir or not (Path(run_dir) / BEST).is_file():
        return None
    target = Path(run_dir) / settings_file.name
    target.write_bytes(settings_file.read_bytes())
    return target
