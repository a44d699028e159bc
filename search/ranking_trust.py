"""The end-of-search checks of how far the choice can be trusted, in one step for the driver."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ray.tune import Result

from cellseg.tracking import Tracker
from search.asha_fidelity import fidelity_lines, log_fidelity, rung_fidelity
from search.trial_intervals import interval_lines, log_intervals, top_intervals


def assess_ranking(
    tracker: Tracker,
    parent_run_id: str,
    results: Sequence[Result],
    *,
    experiment: str,
    metric: str,
    max_epochs: int,
    ci_top: int,
    grace_period: int,
    reduction_factor: float,
    out_dir: Path,
) -> list[str]:
    """Bootstrap intervals of the first ``ci_top`` trials in ``export --best``'s order and the
    fidelity of ASHA's rungs, logged to the trials' and the parent's MLflow runs; returns the
    lines to print."""
    intervals, missing = top_intervals(
        tracker, experiment=experiment, parent_run_id=parent_run_id, top=ci_top
    )
    table = interval_lines(intervals, metric, missing)
    log_intervals(tracker, parent_run_id, intervals, lines=table, out_dir=out_dir)
    fidelity = rung_fidelity(
        results,
        metric=metric,
        max_epochs=max_epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    log_fidelity(tracker, parent_run_id, fidelity)
    return [
        *table,
        *fidelity_lines(fidelity, max_epochs=max_epochs),
    ]
