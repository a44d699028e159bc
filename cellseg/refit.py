"""What ``cellseg refit`` trains: a run's configuration on every training image, for as many
optimizer steps as that run took to its best validation.

The rule (Goodfellow, Bengio and Courville, *Deep Learning*, 2016, section 7.8, algorithm 7.2:
after early stopping, retrain on all the data for the same number of parameter updates): the
source reached its best validation after ``best_epoch`` epochs over ``source_images`` training
images, so the refit over ``all_images`` trains ``ceil(best_epoch * source_images / all_images)``
epochs, at least one; with the same batch size that is about the same number of steps, and the
learning-rate schedule spans the refit's own epochs. The source's images are read from its
recorded dataset profile, so data that grew since the search is counted as it was then.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from cellseg.best_run import EXPORTABLE_SOURCES, fingerprints_of
from cellseg.config import Config, apply_overrides, load_config
from cellseg.data import scan_train, split_sizes
from cellseg.errors import TrackingError
from cellseg.tracking import CONFIG_ARTIFACT, REFIT_SEARCH_TAG, REFIT_TAG, RunRecord, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitPlan:
    """The refit's config, its source run and search, and how its epoch count was reached."""

    config: Config
    source: RunRecord | None  # None for a refit of a config file
    search: str | None
    rule: str  # e.g. "ceil(4 x 6 / 8) = 3", shown and logged as a tag

    def tags(self) -> dict[str, str]:
        """The refit run's tags: its source run and search, and the epoch rule."""
        tags = {"cellseg.refit_epochs": self.rule}
        if self.source is not None:
            tags[REFIT_TAG] = self.source.run_id
        if self.search:
            tags[REFIT_SEARCH_TAG] = self.search
        return tags


def best_epoch(history: list[tuple[int, float]]) -> int | None:
    """The first epoch with the highest finite value (``fit`` keeps the first of equal bests)."""
    finite = [(epoch, value) for epoch, value in history if math.isfinite(value)]
    if not finite:
        return None
    top = max(value for _, value in finite)
    return min(epoch for epoch, value in finite if value == top)


def refit_epochs(best: int, source_images: int, all_images: int) -> int:
    """``ceil(best * source_images / all_images)``, at least 1: the source's steps on more images."""
    return max(1, math.ceil(best * source_images / all_images))


def _overrides(root: str, epochs: int | None) -> dict[str, object]:
    return {"data.root": root, "data.val_fraction": 0.0, **({"train.epochs": epochs} if epochs else {})}


def plan_from_config(path: Path, data_root: str, overrides: list[str], epochs: int | None) -> RefitPlan:
    """A refit of a config file on ``data_root``: its ``train.epochs`` (or ``epochs``), no source."""
    root = str(Path(data_root).resolve())
    scan_train(root)  # the data's errors before any run is opened
    cfg = apply_overrides(load_config(path, _overrides(root, epochs)), overrides)
    rule = f"--epochs {epochs}" if epochs else f"train.epochs of {path}"
    return RefitPlan(cfg, None, None, rule)


def plan_from_run(
    tracker: Tracker,
    source: RunRecord,
    search: str | None,
    *,
    data_root: str | None,
    overrides: list[str],
    epochs: int | None,
    scratch: Path,
) -> RefitPlan:
    """A refit of run ``source``: its logged ``config.yaml`` on every image of ``data_root`` (default:
    the source's data), for the rule's epochs unless ``epochs`` is given."""
    if source.source not in EXPORTABLE_SOURCES:
        raise TrackingError(
            f"run {source.run_id} ({source.name}) is not a training run or a search's trial "
            f"(cellseg.source {source.source or 'unset'!r}); pass one of those with --run-id"
        )
    try:
        config_file = tracker.download_artifact(source.run_id, CONFIG_ARTIFACT, scratch)
    except TrackingError as exc:
        raise TrackingError(
            f"{exc}; refit its configuration from a file with --config FILE --data DIR"
        ) from exc
    source_cfg = load_config(config_file)
    root = str(Path(data_root).resolve()) if data_root else source_cfg.data.root
    images = len(scan_train(root))
    metric = source_cfg.train.metric
    found = best_epoch(tracker.metric_history(source.run_id, metric))
    profile = tracker.dataset_profile(source.run_id)
    source_images = split_sizes(profile["train_images"], profile["val_fraction"])[0] if profile else None
    rule = f"--epochs {epochs}"
    if epochs is None:
        what = f"run {source.run_id} ({source.name})"
        if found is None:
            raise TrackingError(
                f"{what} logged no {metric} per epoch, so the epoch of its best validation is "
                "unknown; pass --epochs N"
            )
        if source_images is None:
            raise TrackingError(
                f"{what} recorded no training dataset (it predates data fingerprints), so how many "
                "images it trained on is unknown; pass --epochs N"
            )
        epochs = refit_epochs(found, source_images, images)
        rule = f"ceil({found} x {source_images} / {images}) = {epochs}"
    cfg = apply_overrides(load_config(config_file, _overrides(root, epochs)), overrides)
    return RefitPlan(cfg, source, search, rule)


def refit_of(tracker: Tracker, source: RunRecord, data_root: str | None) -> RunRecord:
    """The newest finished refit of ``source`` trained on ``data_root`` (default: the source's
    ``data.root``), found in the source's experiment. A warning names the other refits on that data
    (other ``--set`` or ``--epochs``); TrackingError, naming the refits on other data and the
    command that makes one, when there is none."""
    experiment = tracker.experiment_name(source.run_id)
    root = str(Path(data_root or source.params.get("data.root", "")).resolve())
    refits = [r for r in tracker.tagged(experiment, REFIT_TAG, source.run_id) if r.status == "FINISHED"]
    data_for = fingerprints_of(root)
    found = [r for r in refits if r.fingerprint == data_for(r).digest]
    what = f"run {source.run_id} ({source.name})"
    if not found:
        others = [r for r in refits if r not in found]
        listing = f"; its refits on other data: {', '.join(map(_describe, others))}" if others else ""
        raise TrackingError(
            f"{what} has no finished refit on {root} in experiment {experiment!r} of {tracker.uri}"
            f"{listing}; make one with: cellseg refit --run-id {source.run_id}"
            f"{f' --data {root}' if data_root else ''} --tracking-uri {tracker.uri}"
        )
    if len(found) > 1:
        log.warning(
            "%s has %d finished refits on %s; taking the newest, %s, over %s",
            what,
            len(found),
            root,
            _describe(found[-1]),
            ", ".join(map(_describe, found[:-1])),
        )
    return found[-1]


def _describe(refit: RunRecord) -> str:
    """A refit as a warning names it: id, name, epochs, data and start time."""
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(refit.start_time))
    return (
        f"{refit.run_id} ({refit.name}: {refit.params.get('train.epochs', '?')} epochs on "
        f"{refit.params.get('data.root', '?')}, started {started})"
    )
