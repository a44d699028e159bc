"""How far the search's order can be trusted: bootstrap intervals of the top trials' AP50.

After the trials end, the driver restores the best checkpoint (``best.pt``, the model ``export
--best`` ships) of each of the top trials and predicts its validation split once, on CUDA when the
driver has a GPU, else on CPU: one validation pass per trial, as long as one epoch's validation
of that trial. The bootstrap over images (cellseg.bootstrap) then adds about a second. Every trial
is resampled with the same seed, so on the same validation images the resamples are paired: the
share of them in which a trial scores at least as high as the best says how firm the order is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Result

from cellseg.bootstrap import SEED, Interval
from cellseg.checkpoint import BEST
from cellseg.commands import checkpoint_interval
from cellseg.evaluation import UNDEFINED
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
    trial_id: str
    value: float
    interval: Interval

    def share_at_least(self, best: TrialInterval) -> float | None:
        """Share of the paired resamples in which this trial's AP50 is at least ``best``'s; None
        when the two were validated on different images (a searched split)."""
        if self.interval.image_ids != best.interval.image_ids:
            return None
        mine, theirs = self.interval.samples, best.interval.samples
        both = (mine != UNDEFINED) & (theirs != UNDEFINED)
        return float(np.mean(mine[both] >= theirs[both])) if both.any() else None

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


def top_intervals(results: Sequence[Result], *, metric: str, top: int) -> list[TrialInterval]:
    """The intervals of the ``top`` best trials (the search's order), best first."""
    ranked = ranked_trials(results, metric)[:top]
    found = []
    for i, result in enumerate(ranked, 1):
        name = Path(result.path).name
        if result.checkpoint is None:
            log.warning("%s kept no checkpoint: no interval", name)
            continue
        log.info("interval %d of %d: predicting the validation images with %s", i, len(ranked), name)
        with result.checkpoint.as_directory() as directory:
            interval = checkpoint_interval(Path(directory) / BEST, device="auto")
        trial_id = str((result.metrics or {}).get("trial_id", ""))
        found.append(TrialInterval(name, trial_id, best_value(result, metric), interval))
    return found


def interval_lines(intervals: Sequence[TrialInterval], metric: str) -> list[str]:
    """The end-of-search table of the top trials with their intervals, and a note when the
    runner-up is within noise of the best."""
    if not intervals:
        return []
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
    return lines


def log_intervals(
    tracker: Tracker,
    *,
    experiment: str,
    parent_run_id: str,
    intervals: Sequence[TrialInterval],
    metric: str,
    out_dir: Path,
) -> None:
    """Each top trial's interval to its child run, and the table, the best trial's interval and a
    plot of all of them (error bars) to the parent run."""
    if not intervals:
        return
    runs = {
        r.tags.get(TRIAL_TAG): r.run_id
        for r in tracker.records(experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    }
    best = intervals[0]
    for trial in intervals:
        if trial.trial_id in runs:
            tracker.log_metrics(runs[trial.trial_id], trial.metrics(best), step=0)
        else:
            log.warning("no MLflow run of %s: its interval is only printed", trial.name)
    tracker.log_metrics(
        parent_run_id,
        {best_metric_key(k): v for k, v in best.bounds().items()},
        step=0,
    )
    tracker.log_text(
        parent_run_id, "\n".join(interval_lines(intervals, metric)) + "\n", "summary/top_intervals.txt"
    )
    plot = plot_intervals(
        [t.name for t in intervals],
        [t.interval.value for t in intervals],
        [t.interval.low for t in intervals],
        [t.interval.high for t in intervals],
        out_dir / "top_intervals.png",
        CI_METRIC,
    )
    tracker.log_artifact(parent_run_id, plot, "summary")
