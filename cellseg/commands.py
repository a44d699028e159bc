"""What the CLI commands do: train with MLflow tracking, evaluate, export and score."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellseg.best_run import Choice, choose, has_checkpoint, search_name
from cellseg.bootstrap import Interval, prediction_interval
from cellseg.checkpoint import BEST, checkpoint_config, file_sha256, load_checkpoint, restore_model
from cellseg.config import Config, TrainConfig, flatten
from cellseg.data import (
    check_test_header,
    dataset_fingerprint,
    ground_truth_maps,
    load_test_images,
    read_image,
    targets_from_label_maps,
)
from cellseg.engine import SplitPredictions, predict_split, split_metrics, target_truth
from cellseg.errors import ConfigError, DataError, TrackingError
from cellseg.evaluation import coco_max_dets, score_results_file, truth_from_masks
from cellseg.export import export_predictions, write_provenance, write_submission
from cellseg.inference_settings import InferenceSettings, read_members, read_settings, settings_file_name
from cellseg.plots import plot_class_distribution
from cellseg.precision import training_amp, validation_amp
from cellseg.refit import RefitPlan, plan_from_config, plan_from_run, refit_of
from cellseg.run_pictures import write_run_pictures
from cellseg.stored_predictions import stored_predictions
from cellseg.tracking import (
    CHECKPOINT_ARTIFACT,
    DEFAULT_EXPERIMENT,
    REFIT_SEARCH_TAG,
    RUN_DIR_TAG,
    SOURCE_TAG,
    RunRecord,
    Tracker,
    best_metric_key,
)
from cellseg.training import FitResult, build_datasets, build_loaders, fit, resolve_device
from cellseg.tta import DEFAULT_IOU_THRESHOLD, check_flips, check_iou_threshold

log = logging.getLogger(__name__)

PROVENANCE_SUFFIX = ".provenance.json"  # test-results.json -> test-results.provenance.json


def train_and_track(
    cfg: Config,
    *,
    name: str,
    experiment: str,
    tracking_uri: str | None,
    resume_from: str | None,
    config_path: Path | None,
    progress: bool,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> FitResult:
    """``fit`` with an MLflow run (nested under ``parent_run_id`` when given, ``tags`` added to
    cellseg's): params, per-epoch metrics, best checkpoint and pictures."""
    tracker = Tracker(tracking_uri)
    tracker.check()
    run_dir = Path(resume_from or Path(cfg.train.output_dir) / name).resolve()
    previous = tracker.tagged(experiment, RUN_DIR_TAG, str(run_dir)) if resume_from else []
    if previous:
        run_id = previous[0].run_id
        tracker.reopen_run(run_id)
    else:
        run_id = tracker.start_run(
            experiment,
            name,
            params=flatten(cfg),
            tags={
                RUN_DIR_TAG: str(run_dir),
                SOURCE_TAG: "train",
                **({"cellseg.config_file": str(config_path)} if config_path else {}),
                **(tags or {}),
            },
            parent_run_id=parent_run_id,
            dataset=dataset_fingerprint(cfg.data),
        )
    try:
        result = fit(
            cfg,
            run_dir=run_dir,
            resume_from=resume_from,
            progress=progress,
            report=lambda m, _: tracker.log_metrics(run_id, m, step=int(m["epoch"])),
        )
        write_run_pictures(run_dir, resolve_device(cfg.train.device))
    except BaseException as exc:
        tracker.fail_run(run_id, exc)
        raise
    tracker.finish_run(run_id, run_dir, cfg, result.best_metric)
    print(f"MLflow run {run_id} in {tracker.uri}")
    return result


def refit_and_track(
    *,
    run_id: str | None,
    best: bool,
    search: str | None,
    config_path: Path | None,
    data_root: str | None,
    overrides: list[str],
    epochs: int | None,
    name: str | None,
    experiment: str | None,
    tracking_uri: str | None,
    scratch: Path,
    progress: bool,
) -> tuple[RefitPlan, FitResult]:
    """Train run ``run_id``'s configuration (or ``best``'s choice, or a config file) on every
    training image, for the epochs ``cellseg.refit`` says; logged as a refit run (tag
    ``cellseg.refit``: the source run) nested under the source's search, in the source's
    experiment (``experiment``, default ``cellseg``, for ``best`` and a config file)."""
    if config_path is not None:
        if not data_root:
            raise ConfigError("refit --config needs --data DIR, the dataset whose every image it trains on")
        plan = plan_from_config(config_path, data_root, overrides, epochs)
        experiment = experiment or DEFAULT_EXPERIMENT
    else:
        tracker = Tracker(tracking_uri)
        tracker.check()
        if best:
            experiment = experiment or DEFAULT_EXPERIMENT
            choice = chosen_best(tracker, experiment, search, data_root, "refit --best")
            source, found_search = choice.chosen.record, choice.search
        else:
            source = tracker.record(run_id)
            home = tracker.experiment_name(source.run_id)
            if experiment not in (None, home):
                raise ConfigError(
                    f"--experiment {experiment}: run {source.run_id} ({source.name}) is in experiment "
                    f"{home!r}, where its refit is logged (beside it, under its search); drop "
                    f"--experiment or pass --experiment {home}"
                )
            experiment = home
            found_search = search_name(tracker.record(source.parent_id)) if source.parent_id else None
        plan = plan_from_run(
            tracker,
            source,
            found_search,
            data_root=data_root,
            overrides=overrides,
            epochs=epochs,
            scratch=scratch,
        )
    what = f"run {plan.source.run_id} ({plan.source.name})" if plan.source else str(config_path)
    if plan.search:
        what += f" of search {plan.search!r}"
    print(
        f"refit of {what}: {plan.config.train.epochs} epochs ({plan.rule}) on every image of {plan.config.data.root}"
    )
    stem = plan.source.name if plan.source else Path(config_path or "config").stem
    result = train_and_track(
        plan.config,
        name=name or f"refit-{stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment=experiment,
        tracking_uri=tracking_uri,
        resume_from=None,
        config_path=config_path,
        progress=progress,
        parent_run_id=plan.source.parent_id if plan.source else None,
        tags={SOURCE_TAG: "refit", **plan.tags()},
    )
    return plan, result


def _validated_checkpoint(checkpoint: str | Path, data_root: str | None) -> tuple[dict[str, Any], Config]:
    """A checkpoint's state and its config, on ``data_root`` if given; ConfigError for a refit,
    which has no validation split."""
    state = load_checkpoint(checkpoint)
    cfg = config_on_data(checkpoint_config(state), data_root)
    if cfg.data.val_fraction == 0:
        raise ConfigError(
            f"{checkpoint}: trained with data.val_fraction 0 (a refit), so it has no validation "
            "split; score its export instead (cellseg export, then cellseg score)"
        )
    return state, cfg


def _predicted_split(
    state: dict[str, Any], cfg: Config, *, device: str | None, progress: bool = False, with_loss: bool = False
) -> tuple[SplitPredictions, list[str]]:
    """The checkpoint's model run over the validation split of ``cfg`` (on ``device`` if given,
    else on the config's own) in the precision its run validated in, and the names of the split's
    images in image id order."""
    where = resolve_device(device or cfg.train.device)
    model, _ = restore_model(state, where)
    _, val_loader, _ = build_loaders(cfg, where)
    split = predict_split(
        model,
        val_loader,
        where,
        progress=progress,
        amp=training_amp(cfg.train, where),
        with_loss=with_loss,
        predict_amp=validation_amp(cfg.train, where),  # as the run validated
    )
    return split, val_loader.dataset.names


def validation_predictions(
    checkpoint: str | Path,
    *,
    data_root: str | None = None,
    device: str | None = None,
    progress: bool = False,
    with_loss: bool = False,
) -> tuple[Config, SplitPredictions, list[str]]:
    """A checkpoint's config, its model's predictions on the validation split that config
    defines (on ``data_root`` if given, on ``device`` if given, else on the config's own) and
    the ids of that split's items, in image id order."""
    state, cfg = _validated_checkpoint(checkpoint, data_root)
    split, names = _predicted_split(state, cfg, device=device, progress=progress, with_loss=with_loss)
    return cfg, split, names


def checkpoint_interval(
    checkpoint: str | Path, *, data_root: str | None = None, device: str | None = None
) -> Interval:
    """The bootstrap interval of segm AP50 of a checkpoint on its validation split, from the
    validation predictions the checkpoint stores when they were made on that split of the same
    data (cellseg.stored_predictions), else from its model run again."""
    state, cfg = _validated_checkpoint(checkpoint, data_root)
    _, val = build_datasets(cfg)
    predictions = stored_predictions(state, val.names, dataset_fingerprint(cfg.data).digest)
    if predictions is None:
        split, _ = _predicted_split(state, cfg, device=device)
        truths, predictions = split.truths, split.predictions
    else:
        truths = [target_truth(val[index][1]) for index in range(len(val))]
    return prediction_interval(
        truths, predictions, val.names, max_dets=coco_max_dets(cfg.model.detections_per_img)
    )


def evaluate_checkpoint(
    checkpoint: str | Path, *, data_root: str | None, progress: bool, interval: bool = False
) -> tuple[dict[str, float], Interval | None]:
    """The validation metrics of a checkpoint on the split its config defines, and the bootstrap
    interval of its segm AP50 when ``interval`` is asked for."""
    cfg, split, names = validation_predictions(
        checkpoint, data_root=data_root, progress=progress, with_loss=True
    )
    max_dets = coco_max_dets(cfg.model.detections_per_img)
    metrics = split_metrics(split, max_dets=max_dets)
    if not interval:
        return metrics, None
    return metrics, prediction_interval(split.truths, split.predictions, names, max_dets=max_dets)


def config_on_data(cfg: Config, data_root: str | Path | None) -> Config:
    """``cfg`` reading its data from ``data_root`` when given (the same split settings)."""
    if not data_root:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(data_root).resolve())))


def chosen_run(
    tracker: Tracker,
    *,
    run_id: str | None,
    search: str | None,
    experiment: str,
    data_root: str | None,
    scratch: Path,
    refit: bool = False,
) -> tuple[str, Path, dict[str, Any]]:
    """Run ``run_id``, else the best run for ``data_root`` (``--best``), or with ``refit`` that
    run's refit: (run id, downloaded checkpoint, provenance)."""
    if not run_id:
        return best_checkpoints(tracker, experiment, search, data_root, scratch, 1, refit)[0]
    record, source = tracker.record(run_id), None
    if refit:
        record, source = refit_of(tracker, record, data_root), record
    found_search = record.tags.get(REFIT_SEARCH_TAG) or (
        search_name(tracker.record(record.parent_id)) if record.parent_id else None
    )
    return (
        record.run_id,
        tracker.download_checkpoint(record.run_id, scratch / record.run_id),
        _provenance(record, search=found_search, source=source),
    )


Member = tuple[str | None, Path, dict[str, Any]]  # (run id, checkpoint, provenance) of one model


def tuned_settings(
    tracker: Tracker, members: list[Member], data_root: str | None, scratch: Path
) -> tuple[InferenceSettings, Path, str] | str:
    """The settings ``cellseg tune-inference`` saved for these runs (best first; a refit's
    source stands for the refit) beside the first one's checkpoint: (settings, file, that run),
    or why there are none usable. DataError when they were tuned for other checkpoints than the
    runs' ``best.pt`` now or on other data than ``data_root`` under the runs' split."""
    runs = [m[2].get("refit_of", {}).get("run_id") or m[0] for m in members]
    name = settings_file_name(len(runs))
    found = tracker.download_if_present(runs[0], f"{CHECKPOINT_ARTIFACT}/{name}", scratch / str(runs[0]))
    if found is None:
        if len(runs) == 1:
            return "the run has none tuned, or tune-inference found none better; see cellseg tune-inference"
        return (
            f"none tuned for the ensemble of the {len(runs)} best runs; see cellseg tune-inference "
            f"--best --ensemble {len(runs)}"
        )
    tuned_for = read_members(found) or runs[:1]  # naming no runs: tuned for the run it is beside
    if tuned_for != runs:
        return (
            f"{name} of run {runs[0]} was tuned for runs {', '.join(tuned_for)}, but the runs chosen "
            f"now are {', '.join(map(str, runs))}; run cellseg tune-inference --best --ensemble "
            f"{len(runs)} again"
        )
    settings = read_settings(found)
    _check_tuned_for(tracker, found, runs, members, data_root, scratch)
    return settings, found, str(runs[0])


def _check_tuned_for(
    tracker: Tracker, found: Path, runs: list, members: list[Member], data_root: str | None, scratch: Path
) -> None:
    """DataError unless settings file ``found`` names the SHA-256 of each run's ``best.pt`` (a
    refit's source's, downloaded) and the fingerprint of ``data_root`` under their split."""
    checkpoints = []
    for run, (run_id, checkpoint, _) in zip(runs, members):
        if run != run_id:  # a refit: the settings were tuned on its source's checkpoint
            checkpoint = tracker.download_if_present(run, f"{CHECKPOINT_ARTIFACT}/{BEST}", scratch / str(run))
        if checkpoint is None:
            raise DataError(
                f"run {run} has tuned settings ({found.name}) but no {BEST} to check them against; "
                "export with --no-tuned-settings"
            )
        checkpoints.append(checkpoint)
    saved = json.loads(found.read_text())
    data = config_on_data(checkpoint_config(load_checkpoint(checkpoints[0])), data_root).data
    now = {
        "checkpoint_sha256": [file_sha256(c) for c in checkpoints],
        "data_fingerprint": dataset_fingerprint(data).digest,
    }
    stale = [f"{key} {saved.get(key)} != {value}" for key, value in now.items() if saved.get(key) != value]
    if stale:
        raise DataError(
            f"run {runs[0]}: its {CHECKPOINT_ARTIFACT}/{found.name} was tuned for another checkpoint "
            f"or other data than {data.root} ({'; '.join(stale)}); tune again with cellseg "
            f"tune-inference --run-id {runs[0]}, or export with --no-tuned-settings"
        )


def export_run(
    *,
    checkpoints: list[str],
    run_id: str | None,
    best: bool,
    search: str | None,
    experiment: str,
    tracking_uri: str | None,
    data_root: str | None,
    output: Path,
    zip_path: Path | None,
    score_threshold: float | None,
    scratch: Path,
    progress: bool,
    ensemble: int = 1,
    flips: tuple[str, ...] = (),
    iou_threshold: float | None = None,
    refit: bool = False,
    use_tuned: bool = True,
) -> dict[str, Any]:
    """Predict every test image with one or more checkpoints (files, an MLflow run, or the best
    ``ensemble`` runs), on the image and its ``flips`` views, merged as ``cellseg.tta`` says.

    Runs from MLflow (``run_id``, or the ``ensemble`` best of ``best``) predict with the settings
    ``cellseg tune-inference`` saved for exactly those runs beside the best one's checkpoint,
    unless ``use_tuned`` is False; those settings hold their own scales, flips, ensemble size,
    merge IoU and score threshold, so giving flips, merge IoU or score threshold as well is an
    error; an ensemble whose tuned size is below ``ensemble`` exports its best members only.
    Writes the submission, a class-distribution picture and ``<output stem>.provenance.json``
    naming the model that made it (run, search, metric, data fingerprint; every member of an
    ensemble; the flips and the merge IoU; the inference settings). With ``refit`` the chosen
    run's refit (``cellseg refit``) is exported instead, its source recorded as ``refit_of``,
    with the settings tuned for that source.
    """
    if refit and checkpoints:
        raise ConfigError(
            "--refit exports the refit of the run --best or --run-id chooses; drop it with --checkpoint"
        )
    if ensemble < 1:
        raise ConfigError(f"--ensemble {ensemble}: give the number of best runs to merge, 1 or more")
    if ensemble > 1 and not best:
        raise ConfigError(
            "--ensemble K merges the K best runs of --best; add --best, or pass --checkpoint once per model"
        )
    flips = check_flips(flips)
    merge_iou = check_iou_threshold(DEFAULT_IOU_THRESHOLD if iou_threshold is None else iou_threshold)
    tracker, members, tuned = None, [], None
    untuned = "tuned settings apply to runs from MLflow: --best or --run-id"
    if not use_tuned:
        untuned = "--no-tuned-settings"
    if checkpoints:
        members = [(None, Path(c), {}) for c in checkpoints]
    else:
        tracker = Tracker(tracking_uri)
        tracker.check()
        if ensemble > 1:
            members = best_checkpoints(tracker, experiment, search, data_root, scratch, ensemble, refit)
        else:
            members = [
                chosen_run(
                    tracker,
                    run_id=None if best else run_id,
                    search=search,
                    experiment=experiment,
                    data_root=data_root,
                    scratch=scratch,
                    refit=refit,
                )
            ]
        if use_tuned:
            found = tuned_settings(tracker, members, data_root, scratch)
            tuned, untuned = (found, "") if isinstance(found, tuple) else (None, found)
    if tuned and (flips or iou_threshold is not None or score_threshold is not None):
        raise ConfigError(
            f"run {members[0][0]} has tuned inference settings ({tuned[0].describe()}), which set "
            "the flips, merge IoU and score threshold; drop --tta / --merge-iou / --score-threshold, "
            "or pass --no-tuned-settings to set them by hand"
        )
    if tuned:
        members = members[: tuned[0].models]  # the search found fewer members better
    states = [load_checkpoint(checkpoint) for _, checkpoint, _ in members]
    device = resolve_device(checkpoint_config(states[0]).train.device)
    models, configs = zip(*(restore_model(state, device) for state in states))
    for (_, checkpoint, provenance), state, cfg in zip(members, states, configs):
        if not provenance:
            metric = cfg.train.metric
            provenance.update(
                run_id=None,
                run_name=None,
                search=None,
                metric=metric,
                metric_value=state.get("metrics", {}).get(metric),
                fingerprint=None,
            )
        provenance["checkpoint"] = str(checkpoint)
    run_id, checkpoint, provenance = members[0]
    provenance = dict(provenance)
    root = data_root or configs[0].data.root
    test_images = load_test_images(root)
    max_pixels = configs[0].data.max_pixels
    for test_image in test_images:  # every header, before any image is decoded
        check_test_header(test_image, max_pixels=max_pixels)
    results = export_predictions(
        list(models),
        test_images,
        functools.partial(read_image, max_pixels=max_pixels),
        device=device,
        score_threshold=score_threshold or 0.0,
        flips=flips,
        iou_threshold=merge_iou,
        settings=tuned[0] if tuned else None,
        progress=progress,
    )
    write_submission(results, test_images, output, zip_path=zip_path)
    picture = plot_class_distribution(results, output.with_name(f"{output.stem}-classes.png"))
    provenance_path = output.with_name(f"{output.stem}{PROVENANCE_SUFFIX}")
    provenance.update(
        data=str(Path(root).resolve()),
        tracking_uri=tracker.uri if tracker else None,
        experiment=experiment if tracker else None,
        output=str(output.resolve()),
        written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ensemble=[m[2] for m in members] if len(members) > 1 else None,
        tta_flips=list(flips),
        merge_iou_threshold=merge_iou if len(members) > 1 or flips else None,
        inference_settings=({**tuned[0].params(), "tuned_run": tuned[2]} if tuned else None),
    )
    write_provenance(provenance_path, provenance)
    if tracker is not None:
        for path in (output, picture, provenance_path):
            tracker.log_artifact(run_id, path, "export")
    return {
        **{
            k: provenance[k]
            for k in ("run_id", "run_name", "search", "metric", "metric_value", "fingerprint")
        },
        **({"refit_of": provenance["refit_of"]["run_id"]} if refit else {}),
        "results": output,
        "zip": zip_path,
        "picture": picture,
        "provenance": provenance_path,
        "checkpoint": checkpoint,
        "models": len(models),
        "tta_flips": ",".join(flips) or None,
        "inference_settings": (
            f"tuned ({tuned[0].describe()}; {tuned[1].name} of run {tuned[2]})"
            if tuned
            else f"the model's own ({untuned})"
        ),
        "images": len(test_images),
        "detections": len(results),
    }


def _provenance(record: RunRecord, *, search: str | None, source: RunRecord | None = None) -> dict[str, Any]:
    """What the export records about run ``record``; for a refit, ``source`` as ``refit_of``."""
    metric = record.params.get("train.metric", TrainConfig.metric)
    return {
        "run_id": record.run_id,
        "run_name": record.name,
        "search": search,
        "metric": metric,
        "metric_value": record.metrics.get(best_metric_key(metric)),
        "fingerprint": record.fingerprint,
        **({"refit_of": _provenance(source, search=search)} if source else {}),
    }


def chosen_best(
    tracker: Tracker, experiment: str, search: str | None, data_root: str | None, command: str
) -> Choice:
    """``cellseg.best_run``'s choice for ``data_root`` in ``experiment``; ``command`` names the
    command in the error when ``data_root`` is missing."""
    if not data_root:
        raise ConfigError(
            f"{command} needs --data DIR: the best run is chosen among the runs trained on that dataset"
        )
    return choose(
        tracker.records(experiment),
        data_root,
        search=search,
        where=f"experiment {experiment!r} of {tracker.uri}",
    )


def best_checkpoints(
    tracker: Tracker,
    experiment: str,
    search: str | None,
    data_root: str | None,
    scratch: Path,
    count: int = 1,
    refit: bool = False,
) -> list[tuple[str, Path, dict[str, Any]]]:
    """The ``count`` best runs for ``data_root`` (cellseg.best_run's rule) whose checkpoints
    download, best first: (run id, checkpoint, provenance) each. With ``refit``, the refits of
    the ``count`` best runs (the runs ``refit --best`` takes), each source named as ``refit_of``."""
    choice = chosen_best(tracker, experiment, search, data_root, "export --best")
    if refit:
        return _refits(tracker, choice, scratch, count)
    skipped, found = [], []
    for candidate in choice.ranked:
        record = candidate.record
        if not has_checkpoint(record):  # dropped by its search's --keep-top: not a fault
            continue
        try:
            checkpoint = tracker.download_checkpoint(record.run_id, scratch / record.run_id)
        except TrackingError as exc:
            log.warning("skipping run %s (%s): %s", record.run_id, record.name, exc)
            skipped.append(record.run_id)
            continue
        found.append(
            (
                record.run_id,
                checkpoint,
                {**_provenance(record, search=choice.search), **candidate.choice_note()},
            )
        )
        if len(found) == count:
            found[0][2]["skipped_runs"] = skipped
            return found
    if not found:
        raise TrackingError(
            f"none of the {len(choice.ranked)} exportable runs of {choice.group.kind} "
            f"{choice.group.name!r} has its checkpoint artifact in {tracker.uri} (skipped: "
            f"{', '.join(skipped)}); pass --search NAME to choose another search"
        )
    raise TrackingError(
        f"--ensemble {count} needs {count} runs with checkpoints, but {choice.group.kind} "
        f"{choice.group.name!r} has {len(found)} (of {len(choice.ranked)} exportable runs on this "
        f"data; skipped: {', '.join(skipped) or 'none'}); ask for fewer, or pass --search NAME "
        "for a search with more trials (a search keeps the checkpoints of its --keep-top best)"
    )


def _refits(
    tracker: Tracker, choice: Choice, scratch: Path, count: int
) -> list[tuple[str, Path, dict[str, Any]]]:
    if len(choice.kept) < count:
        raise TrackingError(
            f"--ensemble {count} --refit needs {count} runs, but {choice.group.kind} "
            f"{choice.group.name!r} has {len(choice.kept)} exportable runs with checkpoints on this data"
        )
    found = []
    for candidate in choice.kept[:count]:
        refit = refit_of(tracker, candidate.record, choice.data.root)
        found.append(
            (
                refit.run_id,
                tracker.download_checkpoint(refit.run_id, scratch / refit.run_id),
                _provenance(refit, search=choice.search, source=candidate.record),
            )
        )
    return found


def score_export(results: Path, data_root: Path) -> dict[str, float]:
    """Score a test-results.json against a synthetic dataset's ``test_ground_truth/``."""
    truths = []
    for test_image in load_test_images(data_root):
        target = targets_from_label_maps(ground_truth_maps(data_root, test_image))
        truths.append(truth_from_masks(test_image.image_id, target["masks"], target["labels"]))
    return score_results_file(results, truths)
