"""How much of a search's wall time its trial slots spent training and validating.

useful share = (seconds the trials spent inside training and validation, summed over trials)
/ (wall time x concurrent trial slots). The rest is set-up (worker start, imports, data, model),
checkpoints, reports, the driver's own work and slots left idle. Each epoch's seconds come from
the training loop (``cellseg.training``: ``epoch_train_s`` and ``epoch_val_s``); Tune's own
trial time (``time_this_iter_s``, which also counts set-up inside the trial and the checkpoint
of each epoch) gives the coarser share Tune sees, for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray.tune import Result
from ray.tune.result import TIME_THIS_ITER_S, TIMESTAMP

from cellseg.training import TRAIN_SECONDS, VAL_SECONDS


@dataclass(frozen=True)
class Efficiency:
    busy_s: float  # trials inside training and validation, summed
    trial_s: float  # Tune's trial time, summed
    wall_s: float
    slots: int

    @property
    def useful_share(self) -> float:
        return self.busy_s / (self.wall_s * self.slots) if self.wall_s > 0 else float("nan")

    @property
    def trial_share(self) -> float:
        return self.trial_s / (self.wall_s * self.slots) if self.wall_s > 0 else float("nan")

    def line(self) -> str:
        return (
            f"useful share: {self.useful_share:.1%} (trials trained and validated {self.busy_s:.0f} s "
            f"in {self.slots} slot(s) x {self.wall_s:.0f} s wall; Tune's trial time "
            f"{self.trial_share:.1%})"
        )

    def metrics(self) -> dict[str, float]:
        """What the parent run logs."""
        return {
            "useful_share": self.useful_share,
            "trial_time_share": self.trial_share,
            "trial_busy_s": self.busy_s,
            "trial_slots": self.slots,
        }


def trial_slots(
    cluster: Mapping[str, float], per_trial: Mapping[str, float], max_concurrent: int, num_samples: int
) -> int:
    """Trials that can run at once: as many as the cluster's resources fit (``per_trial`` names
    Ray's resources, e.g. CPU and GPU), at most ``max_concurrent`` (0: no limit) and
    ``num_samples``; at least one."""
    fits = [int(cluster.get(name, 0.0) // amount) for name, amount in per_trial.items() if amount > 0]
    slots = min(fits, default=num_samples)
    if max_concurrent:
        slots = min(slots, max_concurrent)
    return max(1, min(slots, num_samples))


def efficiency(results: Sequence[Result], *, wall_s: float, slots: int, since: float) -> Efficiency:
    """The search's efficiency from its trials' results reported at or after ``since`` (seconds
    since the epoch: the driver's start, so a resumed search counts only its own session)."""
    busy = trial = 0.0
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or TIMESTAMP not in frame:
            continue
        frame = frame[frame[TIMESTAMP] >= int(since)]
        for column in (TRAIN_SECONDS, VAL_SECONDS):
            if column in frame:
                busy += float(frame[column].fillna(0).sum())
        if TIME_THIS_ITER_S in frame:
            trial += float(frame[TIME_THIS_ITER_S].fillna(0).sum())
    return Efficiency(busy_s=busy, trial_s=trial, wall_s=wall_s, slots=slots)
