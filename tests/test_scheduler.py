"""The search's ASHA chooses the trial to start as Ray's FIFO choice does, in a real Tune run
with trials queued, one retried after a failure (moved to the end of Tune's queue) and some
stopped by ASHA; and it forgets the trials that ended."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from search.scheduler import SearchScheduler

pytestmark = pytest.mark.slow

SCORES = [5, 1, 4, 9, 2, 8, 3, 7, 6, 0]  # a trial's score per epoch, by its index


class CheckedScheduler(SearchScheduler):
    """Records each of its choices beside the one Ray's ``FIFOScheduler`` makes then."""

    def __init__(self, **asha: Any) -> None:
        super().__init__(**asha)
        self.choices: list[tuple[Any, Any]] = []

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        ours = super().choose_trial_to_run(tune_controller)
        self.choices.append((ours, FIFOScheduler.choose_trial_to_run(self, tune_controller)))
        return ours


def fails_once(config: dict[str, Any]) -> None:
    """Three epochs of a score set by ``config["index"]``; trial 3 fails once after its first."""
    marker = Path(config["marker"])
    for epoch in range(1, 4):
        if config["index"] == 3 and epoch == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("failing once")
        tune.report({"score": SCORES[config["index"]] * epoch, "epoch": epoch})


def test_the_choice_is_ray_fifo_choice_and_ended_trials_are_forgotten(tmp_path: Path) -> None:
    scheduler = CheckedScheduler(time_attr="training_iteration", max_t=3, grace_period=1)
    tests = str(Path(__file__).parent)  # the workers import this module's trainable
    ray.init(
        address="local", num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": tests}}
    )
    try:
        results = tune.Tuner(
            tune.with_resources(fails_once, {"cpu": 1}),
            param_space={
                "index": tune.grid_search(list(range(len(SCORES)))),
                "marker": str(tmp_path / "failed-once"),
            },
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler),
            run_config=tune.RunConfig(
                storage_path=str(tmp_path / "tune"),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
            ),
        ).fit()
    finally:
        ray.shutdown()
    assert not results.errors
    assert (tmp_path / "failed-once").exists(), "no trial failed: the retry's requeue went untested"
    started = [ours for ours, _ in scheduler.choices if ours is not None]
    assert len(started) >= len(SCORES) + 1, "fewer starts than trials and the retry"
    assert all(ours is ray_fifo for ours, ray_fifo in scheduler.choices), [
        (str(ours), str(ray_fifo)) for ours, ray_fifo in scheduler.choices if ours is not ray_fifo
    ]
    epochs = [result.metrics["training_iteration"] for result in results]
    assert min(epochs) < 3, "ASHA stopped no trial"
    assert not scheduler._startable, "ended trials are still held"


class StandIn:
    """What the scheduler reads of a trial: its id and status."""

    def __init__(self, trial_id: str, status: str) -> None:
        self.trial_id, self.status = trial_id, status


def test_pending_comes_before_paused_and_ended_trials_are_dropped() -> None:
    scheduler = SearchScheduler(metric="score", mode="max", max_t=3, grace_period=1)
    a, b, c = StandIn("a", Trial.PENDING), StandIn("b", Trial.PAUSED), StandIn("c", Trial.PENDING)
    for trial in (a, b, c):
        scheduler.on_trial_add(None, trial)
    assert scheduler.choose_trial_to_run(None) is a
    a.status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(None) is c, "a PAUSED trial came before a PENDING one"
    c.status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(None) is b
    a.status = b.status = c.status = Trial.TERMINATED  # e.g. restored as ended: no hook said so
    assert scheduler.choose_trial_to_run(None) is None
    assert not scheduler._startable
