"""How far the search's order can be trusted: bootstrap intervals of the top trials' AP50.

After the trials end, the driver downloads the best checkpoint (``checkpoint/best.pt`` of the
trial's MLflow run, the model ``export --best`` ships) of each of the top trials and predicts its
validation split once, on CUDA when the driver has a GPU, else on CPU: one validation pass per
trial, as long as one epoch's validation of that trial. The bootstrap over images
(cellseg.bootstrap) then adds about a second. A trial whose checkpoint ``--keep-top`` dropped gets
no interval. Every trial is resampled with the same seed, so on the same validation images the
resamples are paired: the share of them in which a trial scores at least as high as the best says
how firm the order is.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Result

from cellseg.bootstrap import SEED, Interval, share_at_least
from cellseg.commands import checkpoint_interval
from cellseg.errors import TrackingError
from cellseg.plots import plot_intervals
from cellseg.tracking import PARENT_TAG, Tracker, best_metric_key
from search.mlflow_callback import TRIAL_TAG
from search.summary import best_value, ranked_trials

log = logging.getLogger(__name__)

CI_METRIC = "segm_AP50"  # what the bootstrap measures, whatever train.metric ranks by
NOISY_SHARE = 0.05  # a runner-up at least as good in this share of resamples is within noise


@dataclass(frozen=True)
class TrialInterval:
    """A top trial: the value the search ranked it by and the interval of its segm AP50."""

    name: str  # the trial's folder
    run_id: str  # its MLflow run
    value: float
    interval: Interval

    def share_at_least(self, best: TrialInterval) -> float | None:
        """Share of the paired resamples in which this trial's AP50 is at least ``best``'s; None
        when the two were validated on different images (a searched split)."""
        return share_at_least(self.interval, best.interval)

    def bounds(self) -> dict[str, float]:
        """The interval as metrics: ``segm_AP50_ci95_low`` and ``segm_AP50_ci95_high``."""
        level = round(self.interval.level * 100)
        return {
            f"{CI_METRIC}_ci{level}_low": self.interval.low,
            f"{CI_METRIC}_ci{level}_high": self.interval.high,
        }

    def metrics(self, best: TrialInterval) -> dict[str, float]:
        """What the trial's MLflow run records: its bounds and its share of resamples at least
        as good as ``best`` (when paired)."""
        share = self.share_at_least(best)
        return {**self.bounds(), **({f"{CI_METRIC}_share_at_least_best": share} if share is not None else {})}


def top_intervals(
    tracker: Tracker, results: Sequence[Result], *, experiment: str, parent_run_id: str, metric: str, top: int
) -> tuple[list[TrialInterval], list[str]]:
    """The intervals of the ``top`` best trials (the search's order), best first, and the names of
    those among them whose run keeps no checkpoint."""
    runs = {
        r.tags.get(TRIAL_TAG): r.run_id
        for r in tracker.records(experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    }
    ranked = ranked_trials(results, metric)[:top]
    found, missing = [], []
    with tempfile.TemporaryDirectory(prefix="cellseg-intervals-") as scratch:
        for i, result in enumerate(ranked, 1):
            name = Path(result.path).name
            run_id = runs.get(str((result.metrics or {}).get("trial_id", "")))
            try:
                if run_id is None:
                    raise TrackingError("no MLflow run")
                checkpoint = tracker.download_checkpoint(run_id, Path(scratch) / name)
            except TrackingError as exc:
                log.warning("%s: no interval (%s)", name, exc)
                missing.append(name)
                continue
            log.info("interval %d of %d: predicting the validation images with %s", i, len(ranked), name)
            interval = checkpoint_interval(checkpoint, device="auto")
            checkpoint.unlink()
            found.append(TrialInterval(name, run_id, best_value(result, metric), interval))
    return found, missing


def interval_lines(intervals: Sequence[TrialInterval], metric: str, missing: Sequence[str] = ()) -> list[str]:
    """The end-of-search table of the top trials with their intervals, a note when the runner-up
    is within noise of the best, and one naming the top trials without a checkpoint."""
    gone = (
        [f"no interval for {', '.join(missing)}: no checkpoint kept (--keep-top keeps fewer than --ci-top)"]
        if missing
        else []
    )
    if not intervals:
        return gone
    best, first = intervals[0], intervals[0].interval
    level = f"{first.level:.0%}"
    extra = metric != CI_METRIC  # the ranking value differs from what the bootstrap measures
    lines = [
        f"top {len(intervals)} by {metric}, {level} interval of {CI_METRIC} from {len(first.samples)} "
        f"bootstrap resamples of the {first.images} validation images (seed {SEED}):",
        f"  #  {'trial':<20} {metric:>10}{f' {CI_METRIC:>10}' if extra else ''}  "
        f"{level + ' interval':<18}  as good as #1",
    ]
    for rank, trial in enumerate(intervals, 1):
        share = trial.share_at_least(best) if rank > 1 else None
        lines.append(
            f"{rank:>3}  {trial.name:<20} {trial.value:>10.4f}"
            f"{f' {trial.interval.value:>10.4f}' if extra else ''}  "
            f"[{trial.interval.low:.4f}, {trial.interval.high:.4f}]  "
            f"{'' if share is None else f'{share:.0%}'}".rstrip()
        )
    noisy = [(t, s) for t in intervals[1:] if (s := t.share_at_least(best)) is not None and s >= NOISY_SHARE]
    if noisy:
        runner, share = noisy[0]
        lines.append(
            f"note: {runner.name} scores at least as high as {best.name} in {share:.0%} of the "
            "resamples: on these validation images the order of the top trials is within noise; "
            "train them again with other seeds or validate on more images before trusting it"
        )
    return lines + gone


def log_intervals(
    tracker: Tracker,
    parent_run_id: str,
    intervals: Sequence[TrialInterval],
    *,
    lines: Sequence[str],
    out_dir: Path,
) -> None:
    """Each top trial's interval to its run, and the table (``lines``), the best trial's interval
    and a plot of all of them (error bars) to the parent run."""
    if not intervals:
        return
    best = intervals[0]
    for trial in intervals:
        tracker.log_metrics(trial.run_id, trial.metrics(best), step=0)
    tracker.log_metrics(parent_run_id, {best_metric_key(k): v for k, v in best.bounds().items()}, step=0)
    tracker.log_text(parent_run_id, "\n".join(lines) + "\n", "summary/top_intervals.txt")
    plot = plot_intervals(
        [t.name for t in intervals],
        [t.interval.value for t in intervals],
        [t.interval.low for t in intervals],
        [t.interval.high for t in intervals],
        out_dir / "top_intervals.png",
        CI_METRIC,
    )
    tracker.log_artifact(parent_run_id, plot, "summary")
