"""Did ASHA's early decisions hold? Rank correlation between each rung's metric and the final one.

ASHA stops a trial at a rung (about epoch ``grace_period * reduction_factor**k``, see
:func:`rung_epochs`) when its metric there ranks low. Over the trials that ran every epoch, the Spearman correlation between the metric at a
rung and the value the search ranks by (the trial's best epoch) says whether the rung's order
predicts the final order. Below 0.5 the rung decides poorly, and a longer grace period is
suggested. With fewer than MIN_TRIALS trials at the end no number is given: a rank correlation of
four trials is 1.0 by chance once in 24 orders, so it would only look like evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from ray.tune import Result

from cellseg.tracking import Tracker
from search.summary import best_value, metric_curve, ranked_trials
from search.trainable import reached_max_epochs

MIN_TRIALS = 5
LOW = 0.5


def rung_epochs(grace_period: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """The epochs before ``max_epochs`` at which Ray's ASHAScheduler (one bracket) decides on a
    trial that reports every epoch. Its milestones are ``grace_period * reduction_factor**k``; at
    each epoch it decides at most once, on the latest milestone reached and not yet decided, so
    4.5 (a factor of 1.5) is decided at epoch 5, and of two milestones reached in one epoch
    (a factor below 2) the earlier waits for the next epoch."""
    rungs = int(np.log(max_epochs / grace_period) / np.log(reduction_factor) + 1)
    pending = [grace_period * reduction_factor**k for k in range(rungs)]
    epochs = []
    for epoch in range(1, max_epochs):
        reached = [m for m in pending if m <= epoch]
        if reached:
            pending.remove(max(reached))
            epochs.append(epoch)
    return epochs


@dataclass(frozen=True)
class RungFidelity:
    epoch: int
    trials: int  # trials that ran every epoch and reported the metric at this rung
    spearman: float | None  # None: too few trials, or every trial scored the same


def _at_rung(curve: list[tuple[int, float]], epoch: int) -> float | None:
    """The first value reported at or after ``epoch``: the one ASHA records for that rung."""
    return next((v for e, v in curve if e >= epoch), None)


def rung_fidelity(
    results: Sequence[Result], *, metric: str, max_epochs: int, grace_period: int, reduction_factor: float
) -> list[RungFidelity]:
    """Spearman correlation per rung between the rung's ``metric`` and the best ``metric`` of
    each trial that ran all ``max_epochs``."""
    finished = [r for r in ranked_trials(results, metric) if reached_max_epochs(r.metrics or {}, max_epochs)]
    found = []
    for epoch in rung_epochs(grace_period, reduction_factor, max_epochs):
        pairs = [(_at_rung(metric_curve(r, metric), epoch), best_value(r, metric)) for r in finished]
        pairs = [(at, final) for at, final in pairs if at is not None]
        rho = None
        at, final = (pd.Series(values) for values in zip(*pairs)) if pairs else (pd.Series(), pd.Series())
        if len(pairs) >= MIN_TRIALS and at.nunique() > 1 and final.nunique() > 1:
            rho = float(at.rank().corr(final.rank()))  # Spearman: Pearson of the (mean) ranks
        found.append(RungFidelity(epoch, len(pairs), rho))
    return found


def fidelity_lines(fidelity: Sequence[RungFidelity], *, max_epochs: int) -> list[str]:
    """The printed report: one line per rung (``fidelity``: every rung, in order), and a warning
    with a suggested ``--grace-period`` (the next rung after the last poor one, else
    ``max_epochs``) when a rung's correlation is below LOW."""
    lines = []
    for rung in fidelity:
        if rung.spearman is not None:
            text = (
                f"Spearman {rung.spearman:+.2f} between the metric there and the final one, over "
                f"{rung.trials} trials that ran every epoch"
            )
        elif rung.trials < MIN_TRIALS:
            text = (
                f"no rank correlation: {rung.trials} trials ran every epoch, and fewer than "
                f"{MIN_TRIALS} say nothing (more reach the end with more --num-samples or a "
                "smaller --reduction-factor)"
            )
        else:
            text = f"no rank correlation: all {rung.trials} trials scored the same there or at the end"
        lines.append(f"ASHA rung at epoch {rung.epoch}: {text}")
    low = [r.epoch for r in fidelity if r.spearman is not None and r.spearman < LOW]
    if low:
        suggested = next((r.epoch for r in fidelity if r.epoch > low[-1]), max_epochs)
        lines.append(
            f"warning: the order at epoch {', '.join(map(str, low))} predicts the final order "
            f"poorly (Spearman below {LOW}), so ASHA may have stopped trials that would have ended "
            f"among the best. Suggested: --grace-period {suggested}"
            + (" (ASHA then stops no trial)" if suggested >= max_epochs else "")
        )
    return lines


def log_fidelity(tracker: Tracker, parent_run_id: str, fidelity: Sequence[RungFidelity]) -> None:
    """One metric per rung with a number (``asha_spearman_epoch_<rung>``) and the trials counted."""
    metrics = {f"asha_spearman_epoch_{r.epoch}": r.spearman for r in fidelity if r.spearman is not None}
    if fidelity:
        metrics["asha_fidelity_trials"] = fidelity[0].trials
    tracker.log_metrics(parent_run_id, metrics, step=0)
