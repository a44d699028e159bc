"""The MLflow callback driven with real Tune Trial objects and a real MLflow store on SQLite,
without Ray running: child runs, epochs, statuses, and what a restored search reconciles."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Checkpoint
from ray.tune.experiment import Trial

from cellseg.checkpoint import BEST, save_checkpoint
from cellseg.config import config_to_dict, load_config
from cellseg.tracking import CHECKPOINT_ARTIFACT, CHECKPOINT_DROPPED_TAG, Tracker
from search.mlflow_callback import LOST, PHASE_TAG, TRIAL_TAG, MlflowTrialLogger

TRIALS = Path(__file__).resolve().parents[1] / "trials"
MAX_EPOCHS = 3


@pytest.fixture
def store(tmp_path, easy_root):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_run("e", "s1")
    base = load_config(TRIALS / "demo.yaml", [f"data.root={easy_root}"])
    return tracker, parent, config_to_dict(base)


def logger(tracker: Tracker, parent: str, base: dict, phase: str | None = None) -> MlflowTrialLogger:
    callback = MlflowTrialLogger(
        tracking_uri=tracker.uri,
        experiment="e",
        parent_run_id=parent,
        search_name="s1",
        phase=phase,
        max_epochs=MAX_EPOCHS,
        base=base,
        metric="segm_AP50",
    )
    callback.setup()
    return callback


def trial(trial_id: str, lr: float = 0.01) -> Trial:
    return Trial("train_trial", config={"optim.lr": lr}, trial_id=trial_id, stub=True)


def report(callback: MlflowTrialLogger, t: Trial, epoch: int) -> None:
    result = {
        "epoch": epoch,
        "training_iteration": epoch,
        "segm_AP50": epoch / 10,
        "train_loss": 1.0 / epoch,
        "trial_id": t.trial_id,
        "done": False,
    }
    callback.on_trial_result(0, [t], t, result)
    t.update_last_result(result)


def child(tracker: Tracker, trial_id: str):
    [run] = MlflowClient(tracker.uri).search_runs(
        [tracker.experiment_id("e")], f"tags.`{TRIAL_TAG}` = '{trial_id}'"
    )
    return run


def epochs(tracker: Tracker, run) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracker.uri).get_metric_history(run.info.run_id, "segm_AP50"))


def test_every_trial_is_a_child_run_finished_when_it_ran_every_epoch_else_killed(store):
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    full, stopped = trial("t_00001", 0.01), trial("t_00002", 0.02)
    for t, n in ((full, MAX_EPOCHS), (stopped, 1)):
        callback.on_trial_start(0, [t], t)
        for epoch in range(1, n + 1):
            report(callback, t, epoch)
        callback.on_trial_complete(0, [t], t)
    run = child(tracker, "t_00001")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["model.backbone"]
    assert run.data.metrics["train_loss"] == pytest.approx(1 / 3)
    assert "trial_id" not in run.data.metrics and "done" not in run.data.metrics
    run = child(tracker, "t_00002")
    assert run.info.status == "KILLED" and epochs(tracker, run) == [1]


def test_a_restored_search_brings_every_run_to_tunes_state(store):
    tracker, parent, base = store
    first = logger(tracker, parent, base)
    ended, running, lost = trial("t_00001"), trial("t_00002"), trial("t_00003")
    for t in (ended, running, lost):
        first.on_trial_start(0, [t], t)
        report(first, t, 1)
    report(first, ended, 2)
    # the driver dies: Tune had saved `ended` as ended after epoch 3, `running` as running, and
    # had not saved `lost` at all
    second = pickle.loads(pickle.dumps(first))  # as Tuner.restore brings the callback back
    second.setup()
    ended.update_last_result({"epoch": 3, "training_iteration": 3, "segm_AP50": 0.3})
    ended.set_status(Trial.TERMINATED)
    second.on_step_begin(0, [ended, running])
    run = child(tracker, "t_00001")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]
    run = child(tracker, "t_00003")
    assert run.info.status == "KILLED" and run.data.tags["error"] == LOST
    assert child(tracker, "t_00002").info.status == "RUNNING"

    second.on_trial_start(0, [ended, running], running)  # restored from its epoch-1 checkpoint
    for epoch in (1, 2, 3):
        report(second, running, epoch)
    second.on_trial_complete(0, [ended, running], running)
    run = child(tracker, "t_00002")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]  # 1 not twice


def test_trials_tune_stopped_without_telling_the_callback_are_closed_at_the_end(store):
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    t = trial("t_00001")
    callback.on_trial_start(0, [t], t)
    report(callback, t, 1)
    t.set_status(Trial.TERMINATED)  # --time-budget ran out: Tune stops it, no on_trial_complete
    callback.on_experiment_end([t])
    assert child(tracker, "t_00001").info.status == "KILLED"


def test_a_callback_leaves_the_open_runs_of_the_searchs_other_experiments_alone(store):
    tracker, parent, base = store
    search = logger(tracker, parent, base, phase="s1")
    done = trial("t_00001")
    search.on_trial_start(0, [done], done)
    report(search, done, MAX_EPOCHS)
    search.on_trial_complete(0, [done], done)
    search.on_experiment_end([done])
    repeats = logger(tracker, parent, base, phase="s1--reseed-1")
    repeat = trial("r_00001")
    repeats.on_trial_start(0, [repeat], repeat)
    report(repeats, repeat, 1)
    # the driver dies in the re-seed step; on --resume the first experiment's callback is set up
    # again (before the fix every experiment was fit again) and must not close the repeat's run
    again = pickle.loads(pickle.dumps(search))
    again.setup()
    again.on_step_begin(0, [done])
    again.on_experiment_end([])
    run = child(tracker, "r_00001")
    assert run.info.status == "RUNNING" and run.data.tags[PHASE_TAG] == "s1--reseed-1"
    assert child(tracker, "t_00001").info.status == "FINISHED"
    resumed = pickle.loads(pickle.dumps(repeats))  # the re-seed step's own callback does close it
    resumed.setup()
    resumed.on_experiment_end([])
    run = child(tracker, "r_00001")
    assert run.info.status == "KILLED" and run.data.tags["error"] == LOST


def test_the_node_tag_names_the_node_of_the_trials_latest_epoch(store):
    """A trial's run is tagged with its node once, and again when a retry moved it to another."""
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    t = trial("t_00001")
    callback.on_trial_start(0, [t], t)
    for epoch, node in ((1, "node-a"), (2, "node-a"), (3, "node-b")):
        result = {"epoch": epoch, "training_iteration": epoch, "segm_AP50": 0.1, "node_id": node}
        callback.on_trial_result(0, [t], t, result)
        assert child(tracker, "t_00001").data.tags["ray.node_id"] == node


class LosesOneAnswer(Tracker):
    """A store whose connection drops once, after a run was created but before its params."""

    dropped = False

    def log_params(self, run_id: str, params: dict) -> None:
        if not self.dropped:
            self.dropped = True
            raise ConnectionError("connection reset")
        super().log_params(run_id, params)


def test_a_start_retried_after_a_lost_answer_finds_the_run_it_created(store):
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    callback._tracker = LosesOneAnswer(tracker.uri)
    t = trial("t_00001")
    callback.on_trial_start(0, [t], t)
    assert callback._tracker.dropped and callback.outbox.pending  # queued for a retry
    callback.outbox.flush(force=True)
    report(callback, t, 1)
    assert epochs(tracker, child(tracker, "t_00001")) == [1]  # one run: child() asserts it


class CountsUploads(Tracker):
    """A store that records which runs had a checkpoint uploaded."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.uploaded: list[str] = []

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        if artifact_path == CHECKPOINT_ARTIFACT:
            self.uploaded.append(run_id)
        super().log_artifact(run_id, path, artifact_path)


class EndedTrial(Trial):
    """A stub trial whose latest checkpoint the test sets (and without an error file)."""

    checkpoint: Checkpoint | None = None
    error_file: str | None = None


def ended_trial(folder: Path, number: int, value: float) -> EndedTrial:
    """Trial ``number`` with a checkpoint in ``folder`` whose best.pt scored ``value``."""
    t = EndedTrial("train_trial", config={"optim.lr": value}, trial_id=f"t_{number:05d}", stub=True)
    save_checkpoint(folder / BEST, {"config": {}, "model": {}, "epoch": 1, "metrics": {"segm_AP50": value}})
    t.checkpoint = Checkpoint(str(folder))
    return t


def run_one_epoch(callback: MlflowTrialLogger, t: Trial) -> None:
    """Start ``t``, report its first epoch, end it as Tune ends a trial (by its status)."""
    callback.on_trial_start(0, [t], t)
    report(callback, t, 1)
    callback.on_trial_complete(0, [t], t)


def kept_checkpoint(tracker: Tracker, run_id: str) -> bool:
    return bool(MlflowClient(tracker.uri).list_artifacts(run_id, CHECKPOINT_ARTIFACT))


def test_with_keep_top_a_trial_that_ends_outside_the_top_never_uploads_its_checkpoint(store, tmp_path):
    """--keep-top 1: the first trial uploads, the better second pushes it out, the worse third is
    tagged dropped before any upload; only the best keeps checkpoint/best.pt."""
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    callback.keep_top = 1
    callback._tracker = CountsUploads(tracker.uri)
    runs = {}
    for number, value in enumerate((0.5, 0.9, 0.3), 1):
        t = ended_trial(tmp_path / f"checkpoint_{number}", number, value)
        run_one_epoch(callback, t)
        runs[value] = child(tracker, t.trial_id).info.run_id
    assert callback._tracker.uploaded == [runs[0.5], runs[0.9]]
    client = MlflowClient(tracker.uri)
    for value, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.metrics["best_segm_AP50"] == value
        assert (
            kept_checkpoint(tracker, run_id)
            == (value == 0.9)
            == (CHECKPOINT_DROPPED_TAG not in run.data.tags)
        )
    assert (
        client.get_run(runs[0.3]).data.tags[CHECKPOINT_DROPPED_TAG]
        == "not among the 1 best trials by segm_AP50"
    )


def test_a_retried_trial_that_ends_outside_the_top_loses_the_checkpoint_its_failure_uploaded(store, tmp_path):
    """A FAILED trial's close uploads its checkpoint (failed runs are not ranked); when its retry
    ends outside the --keep-top best, that copy goes too."""
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    callback.keep_top = 1
    run_one_epoch(callback, ended_trial(tmp_path / "best", 1, 0.9))
    retried = ended_trial(tmp_path / "retried", 2, 0.3)
    retried.set_status(Trial.ERROR)
    run_one_epoch(callback, retried)
    run_id = child(tracker, retried.trial_id).info.run_id
    assert child(tracker, retried.trial_id).info.status == "FAILED" and kept_checkpoint(tracker, run_id)
    retried.set_status(Trial.RUNNING)  # Tune restarts it from its checkpoint
    run_one_epoch(callback, retried)
    run = child(tracker, retried.trial_id)
    assert run.info.status == "KILLED" and CHECKPOINT_DROPPED_TAG in run.data.tags
    assert not kept_checkpoint(tracker, run_id)


def server_error(*args: object) -> None:
    raise MlflowException("service unavailable")  # MLflow's INTERNAL_ERROR: HTTP 500


class DownAtOneRead(Tracker):
    """A store that answers one read of a run (``Tracker.record``) with a server error."""

    down = True

    def record(self, run_id: str):
        if not self.down:
            return super().record(run_id)
        self.down = False
        self.client.get_run = server_error
        try:
            return super().record(run_id)
        finally:
            del self.client.get_run


def test_a_close_that_finds_the_store_down_when_ranking_is_retried_not_dropped(store, tmp_path):
    tracker, parent, base = store
    callback = logger(tracker, parent, base)
    callback.keep_top = 1
    callback._tracker = DownAtOneRead(tracker.uri)
    t = ended_trial(tmp_path / "checkpoint", 1, 0.5)
    run_one_epoch(callback, t)
    assert not callback._tracker.down and callback.outbox.pending  # queued for a retry
    callback.outbox.flush(force=True)
    run = child(tracker, t.trial_id)
    assert run.info.status == "KILLED" and kept_checkpoint(tracker, run.info.run_id)
