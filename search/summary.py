"""The end of a search: its best run (the one export --best takes), epochs ASHA saved, and the
parent run's plots."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from ray.tune import Result, ResultGrid
from ray.tune.result import TRAINING_ITERATION

from cellseg.best_run import Candidate
from cellseg.checkpoint import BEST
from cellseg.plots import plot_parallel_coordinates, plot_trial_curves
from cellseg.tracking import CHECKPOINT_ARTIFACT, Tracker, best_metric_key
from search.trial_runs import SEARCHED_KEYS_TAG, TRIAL_TAG

log = logging.getLogger(__name__)


@dataclass
class SearchSummary:
    trials: int
    errors: int
    best_trial: str
    best_trial_id: str
    best_metric: float
    best_config: dict[str, Any]
    best_checkpoint: str
    epochs_run: int
    epochs_full: int
    wall_s: float
    chosen_by: str = ""  # set when the best run is chosen by mean over seeds

    @property
    def epochs_saved(self) -> int:
        return self.epochs_full - self.epochs_run

    def lines(self, metric: str) -> list[str]:
        saved = self.epochs_saved / self.epochs_full if self.epochs_full else 0.0
        return [
            f"trials: {self.trials} ({self.errors} failed)",
            f"{'chosen run' if self.chosen_by else 'best trial'}: {self.best_trial}  {metric} "
            f"{self.best_metric:.4f}{f' ({self.chosen_by})' if self.chosen_by else ''}",
            f"best config: {self.best_config}",
            f"best checkpoint: {self.best_checkpoint}",
            f"wall time: {self.wall_s / 60:.1f} min",
            f"epochs run: {self.epochs_run} of {self.epochs_full} for every trial to the end "
            f"(ASHA saved {self.epochs_saved}, {saved:.0%})",
        ]


def metric_curve(result: Any, metric: str) -> list[tuple[int, float]]:
    """The trial's finite values of ``metric`` as (epoch, value), in the order reported."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame:
        return []
    return [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[metric]) if math.isfinite(v)]


def _succeeded(result: Any, metric: str) -> bool:
    """A trial that ended without error and reported ``metric`` (the only kind export --best takes)."""
    return result.error is None and bool(metric_curve(result, metric))


class SearchFailed(RuntimeError):
    """No trial of the search succeeded."""


def _first_line_of_error(error: BaseException) -> str:
    """The exception line of a trial's error (the last line of its traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def best_value(result: Result, metric: str) -> float:
    return max((v for _, v in metric_curve(result, metric)), default=float("nan"))


def ranked_trials(results: Sequence[Result], metric: str) -> list[Result]:
    """The trials without error that reported ``metric``, best first by their highest value of it
    (the first of equals first): the order the search chooses by."""
    succeeded = [r for r in results if _succeeded(r, metric)]
    return sorted(succeeded, key=lambda r: best_value(r, metric), reverse=True)


def check_succeeded(results: Sequence[Result], metric: str) -> None:
    """SearchFailed naming the first error when every trial failed or none reported ``metric``."""
    if any(_succeeded(r, metric) for r in results):
        return
    failed = [r for r in results if r.error is not None]
    if not failed:
        raise SearchFailed(f"no trial reported {metric} ({len(results)} trials ended)")
    first = failed[0]
    raise SearchFailed(
        f"no trial succeeded: {len(failed)} of {len(results)} failed. The first error, in "
        f"{Path(first.path).name}: {_first_line_of_error(first.error)}. Its traceback is in "
        f"{first.path}/error.txt and in the tag 'error' of its MLflow run"
    )


def summarize(results: Sequence[Result], *, metric: str, max_epochs: int, wall_s: float) -> SearchSummary:
    """Figures of a finished search, from Tune's results (a ResultGrid or a list of Results);
    SearchFailed when no trial succeeded. The best trial is the trial without error with the highest
    finite ``metric`` of any epoch (the first of equals)."""
    results = list(results)
    check_succeeded(results, metric)
    best = ranked_trials(results, metric)[0]
    epochs_run = sum(int((r.metrics or {}).get(TRAINING_ITERATION, 0)) for r in results)
    checkpoint = f"{best.checkpoint.path}/{BEST}" if best.checkpoint else "none"
    return SearchSummary(
        trials=len(results),
        errors=sum(r.error is not None for r in results),
        best_trial=Path(best.path).name,
        best_trial_id=str((best.metrics or {}).get("trial_id", "")),
        best_metric=best_value(best, metric),
        best_config=best.config,
        best_checkpoint=checkpoint,
        epochs_run=epochs_run,
        epochs_full=len(results) * max_epochs,
        wall_s=wall_s,
    )


def as_exported(summary: SearchSummary, chosen: Candidate) -> SearchSummary:
    """``summary`` with its best trial, metric, config (the searched values) and checkpoint taken
    from ``chosen``, the run ``export --best`` takes (``cellseg.best_run.Choice.chosen``); with
    re-seeded configurations, that run is chosen by its configuration's mean over seeds."""
    record = chosen.record
    searched = record.tags.get(SEARCHED_KEYS_TAG, "").split(",")
    return replace(
        summary,
        best_trial=record.name,
        best_trial_id=record.tags.get(TRIAL_TAG, ""),
        best_metric=chosen.value,
        best_config={key: record.params[key] for key in searched if key in record.params},
        best_checkpoint=f"runs:/{record.run_id}/{CHECKPOINT_ARTIFACT}/{BEST}",
        chosen_by=f"by mean best {chosen.metric} over seeds; export --best takes it" if chosen.seeds else "",
    )


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances over completed trials; empty when too few completed."""
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:
        log.info("no parameter importances: %s", exc)
        return {}


def log_summary(
    tracker: Tracker,
    parent_run_id: str,
    results: ResultGrid,
    summary: SearchSummary,
    study: optuna.Study,
    *,
    metric: str,
    out_dir: Path,
) -> None:
    """Best trial and params, curves of every trial, importances and parallel coordinates."""
    tracker.log_metrics(
        parent_run_id,
        {
            best_metric_key(metric): summary.best_metric,
            "epochs_run": summary.epochs_run,
            "epochs_saved": summary.epochs_saved,
            "trials": summary.trials,
            "wall_s": summary.wall_s,
        },
        step=0,
    )
    tracker.set_tags(
        parent_run_id,
        {
            "best_trial": summary.best_trial,
            "best_checkpoint": summary.best_checkpoint,
            **{f"best.{k}": v for k, v in summary.best_config.items()},
        },
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {Path(r.path).name: metric_curve(r, metric) for r in results if r.path}
    tracker.log_artifact(
        parent_run_id, plot_trial_curves(curves, out_dir / "trial_curves.png", metric=metric), "summary"
    )
    rows = [
        {**r.config, metric: max((v for _, v in metric_curve(r, metric)), default=0.0)}
        for r in results
        if r.config
    ]
    if rows:
        tracker.log_artifact(
            parent_run_id,
            plot_parallel_coordinates(rows, metric, out_dir / "parallel_coordinates.png"),
            "summary",
        )
    scores = importances(study)
    if scores:
        tracker.log_metrics(parent_run_id, {f"importance.{k}": v for k, v in scores.items()}, step=0)
        lines = "\n".join(f"{k}: {v:.3f}" for k, v in scores.items())
        tracker.log_text(parent_run_id, lines + "\n", "summary/param_importances.txt")
