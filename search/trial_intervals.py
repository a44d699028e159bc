"""How far the search's order can be trusted: bootstrap intervals of the top trials' AP50.

After the trials end, the driver takes the first trials in ``export --best``'s order
(cellseg.best_run: re-seeded configurations first, by mean over seeds, each best seed first; the
order ``--keep-top`` keeps checkpoints in), downloads the best checkpoint of each
(``checkpoint/best.pt`` of the trial's MLflow run, the model ``export --best`` ships) and takes
the validation predictions it stores (``fit`` keeps the best epoch's, cellseg.stored_predictions);
only a checkpoint without them (or trained on other data) predicts its validation split again, on
CUDA when the driver has a GPU, else on CPU. The bootstrap over images (cellseg.bootstrap) then
adds about a second. A trial whose checkpoint ``--keep-top`` dropped gets no interval, and the
table says why. Every trial is resampled with the same seed, so trials
validated on the same images (by name) are paired: the share of resamples in which a trial scores
at least as high as the first says how firm the order is.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellseg.best_run import Candidate, has_checkpoint, ranked_candidates
from cellseg.bootstrap import SEED, Interval, share_at_least
from cellseg.commands import checkpoint_interval
from cellseg.errors import TrackingError
from cellseg.plots import plot_intervals
from cellseg.tracking import CHECKPOINT_DROPPED_TAG, PARENT_TAG, RunRecord, Tracker, best_metric_key

log = logging.getLogger(__name__)

CI_METRIC = "segm_AP50"  # what the bootstrap measures, whatever train.metric ranks by
NOISY_SHARE = 0.05  # a runner-up at least as good in this share of resamples is within noise


@dataclass(frozen=True)
class TrialInterval:
    """A top trial: the value the search ranked it by and the interval of its segm AP50."""

    name: str  # its MLflow run's name
    run_id: str  # its MLflow run
    value: float  # its own best metric
    interval: Interval
    reseeded: bool = False  # ranked by its configuration's mean over seeds

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


def interval_runs(children: Sequence[RunRecord], top: int) -> tuple[list[Candidate], dict[str, str]]:
    """The first ``top`` of a search's runs (``children``) in ``export --best``'s order: those
    that kept their checkpoint, and why each of the others has none (by run name)."""
    ranked = ranked_candidates(children)[:top]
    dropped = {
        c.record.name: f"its checkpoint was dropped by --keep-top ({c.record.tags[CHECKPOINT_DROPPED_TAG]})"
        for c in ranked
        if not has_checkpoint(c.record)
    }
    return [c for c in ranked if has_checkpoint(c.record)], dropped


def top_intervals(
    tracker: Tracker, *, experiment: str, parent_run_id: str, top: int
) -> tuple[list[TrialInterval], dict[str, str]]:
    """The intervals of the search's first ``top`` runs in ``export --best``'s order, and why
    each of the others among them has none (by run name)."""
    children = tracker.records(experiment, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    kept, missing = interval_runs(children, top)
    found = []
    with tempfile.TemporaryDirectory(prefix="cellseg-intervals-") as scratch:
        for i, run in enumerate(kept, 1):
            name, run_id = run.record.name, run.record.run_id
            try:
                checkpoint = tracker.download_checkpoint(run_id, Path(scratch) / run_id)
            except TrackingError as exc:
                log.warning("%s: no interval (%s)", name, exc)
                missing[name] = f"no checkpoint to download ({exc})"
                continue
            log.info("interval %d of %d: %s", i, len(kept), name)
            interval = checkpoint_interval(checkpoint, device="auto")
            checkpoint.unlink()
            found.append(TrialInterval(name, run_id, run.value, interval, reseeded=bool(run.seeds)))
    return found, missing


def interval_lines(
    intervals: Sequence[TrialInterval], metric: str, missing: Mapping[str, str] | None = None
) -> list[str]:
    """The end-of-search table of the top trials with their intervals, a note when the runner-up
    is within noise of the best, and one per reason some top trials have none (``missing``: run
    name to reason)."""
    reasons: dict[str, list[str]] = {}
    for name, reason in (missing or {}).items():
        reasons.setdefault(reason, []).append(name)
    gone = [f"no interval for {', '.join(names)}: {reason}" for reason, names in reasons.items()]
    if not intervals:
        return gone
    best, first = intervals[0], intervals[0].interval
    level = f"{first.level:.0%}"
    extra = metric != CI_METRIC  # the ranking value differs from what the bootstrap measures
    order = (
        f"in export --best's order (re-seeded configurations first, by mean {metric} over seeds)"
        if any(t.reseeded for t in intervals)
        else f"by {metric}"
    )
    lines = [
        f"top {len(intervals)} {order}, {level} interval of {CI_METRIC} from {len(first.samples)} "
        f"bootstrap resamples of the {first.images} validation images (seed {SEED}):",
        f"  #  {'trial':<24} {metric:>10}{f' {CI_METRIC:>10}' if extra else ''}  "
        f"{level + ' interval':<18}  as good as #1",
    ]
    for rank, trial in enumerate(intervals, 1):
        share = trial.share_at_least(best) if rank > 1 else None
        lines.append(
            f"{rank:>3}  {trial.name:<24} {trial.value:>10.4f}"
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
