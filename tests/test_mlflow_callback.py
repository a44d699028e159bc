"""The MLflow callback driven with real Tune Trial objects, its real writer process and a real
MLflow store on SQLite, without Ray running: child runs, epochs, statuses, and what a restored
search reconciles; with a real `mlflow server` that is down at Tune's setup, the wait for it."""

from __future__ import annotations

import json
import logging
import pickle
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Checkpoint
from ray.tune.experiment import Trial

from cellseg.checkpoint import BEST, save_checkpoint
from cellseg.config import config_to_dict, load_config
from cellseg.tracking import Tracker
from search.mlflow_callback import LOST, MlflowTrialLogger
from search.mlflow_writer import JOURNAL, MlflowWriter
from search.run import MLFLOW_HTTP_DEFAULTS
from search.trial_runs import PHASE_TAG, TRIAL_TAG
from searchutil import free_port, start_server, stop

TRIALS = Path(__file__).resolve().parents[1] / "trials"
MAX_EPOCHS = 3


WAIT_S = 60.0


@pytest.fixture
def store(tmp_path, easy_root):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.start_run("e", "s1")
    base = load_config(TRIALS / "demo.yaml", [f"data.root={easy_root}"])
    yield tracker, parent, config_to_dict(base), tmp_path / "writes"
    for writer in MlflowWriter._open.values():  # the writer processes end with their input
        if not writer.closed:
            writer.process.stdin.close()
            writer.process.wait(timeout=WAIT_S)
    MlflowWriter._open.clear()


def logger(
    tracker: Tracker, parent: str, base: dict, journal: Path, phase: str | None = None
) -> MlflowTrialLogger:
    callback = MlflowTrialLogger(
        tracking_uri=tracker.uri,
        experiment="e",
        parent_run_id=parent,
        search_name="s1",
        phase=phase,
        max_epochs=MAX_EPOCHS,
        base=base,
        metric="segm_AP50",
        journal=journal,
    )
    callback.setup()
    return callback


def written(callback: MlflowTrialLogger) -> None:
    assert callback.wait_for_writes(WAIT_S)


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
    tracker, parent, base, journal = store
    callback = logger(tracker, parent, base, journal)
    full, stopped = trial("t_00001", 0.01), trial("t_00002", 0.02)
    for t, n in ((full, MAX_EPOCHS), (stopped, 1)):
        callback.on_trial_start(0, [t], t)
        for epoch in range(1, n + 1):
            report(callback, t, epoch)
        callback.on_trial_complete(0, [t], t)
    written(callback)
    run = child(tracker, "t_00001")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["model.backbone"]
    assert run.data.metrics["train_loss"] == pytest.approx(1 / 3)
    assert "trial_id" not in run.data.metrics and "done" not in run.data.metrics
    run = child(tracker, "t_00002")
    assert run.info.status == "KILLED" and epochs(tracker, run) == [1]


def test_a_restored_search_brings_every_run_to_tunes_state(store):
    tracker, parent, base, journal = store
    first = logger(tracker, parent, base, journal)
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
    written(second)
    run = child(tracker, "t_00001")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]
    run = child(tracker, "t_00003")
    assert run.info.status == "KILLED" and run.data.tags["error"] == LOST
    assert child(tracker, "t_00002").info.status == "RUNNING"

    second.on_trial_start(0, [ended, running], running)  # restored from its epoch-1 checkpoint
    for epoch in (1, 2, 3):
        report(second, running, epoch)
    second.on_trial_complete(0, [ended, running], running)
    written(second)
    run = child(tracker, "t_00002")
    assert run.info.status == "FINISHED" and epochs(tracker, run) == [1, 2, 3]  # 1 not twice


def test_trials_tune_stopped_without_telling_the_callback_are_closed_at_the_end(store):
    tracker, parent, base, journal = store
    callback = logger(tracker, parent, base, journal)
    t = trial("t_00001")
    callback.on_trial_start(0, [t], t)
    report(callback, t, 1)
    t.set_status(Trial.TERMINATED)  # --time-budget ran out: Tune stops it, no on_trial_complete
    callback.on_experiment_end([t])
    assert child(tracker, "t_00001").info.status == "KILLED"


def test_a_callback_leaves_the_open_runs_of_the_searchs_other_experiments_alone(store):
    tracker, parent, base, journal = store
    search = logger(tracker, parent, base, journal, phase="s1")
    done = trial("t_00001")
    search.on_trial_start(0, [done], done)
    report(search, done, MAX_EPOCHS)
    search.on_trial_complete(0, [done], done)
    search.on_experiment_end([done])
    repeats = logger(tracker, parent, base, journal, phase="s1--reseed-1")
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
    tracker, parent, base, journal = store
    callback = logger(tracker, parent, base, journal)
    t = trial("t_00001")
    callback.on_trial_start(0, [t], t)
    for epoch, node in ((1, "node-a"), (2, "node-a"), (3, "node-b")):
        result = {"epoch": epoch, "training_iteration": epoch, "segm_AP50": 0.1, "node_id": node}
        callback.on_trial_result(0, [t], t, result)
        written(callback)
        assert child(tracker, "t_00001").data.tags["ray.node_id"] == node


def test_a_callback_pickled_before_the_writer_process_writes_to_the_journal_beside_its_outbox(tmp_path):
    """Tuner.restore brings back the callback a search saved: one from before the writer process
    had an outbox file where the journal folder now lies."""
    old = {
        **{"tracking_uri": "sqlite:///x.db", "experiment": "e", "parent_run_id": "p", "base": {}},
        **{"metric": "segm_AP50", "keep_top": 5, "search_name": "s1", "phase": "s1--reseed-1"},
        **{"max_epochs": 3, "drain_timeout_s": 60.0, "trial_tags": None, "_outbox": None},
        "outbox_path": tmp_path / "mlflow-outbox.json",
    }
    callback = MlflowTrialLogger.__new__(MlflowTrialLogger)
    callback.__setstate__(old)
    assert callback.journal == tmp_path / JOURNAL and callback.phase == "s1--reseed-1"
    assert callback.spec.keep_top == 5 and callback._writer is None and not hasattr(callback, "_outbox")


class CheckpointedTrial(Trial):
    """A stub trial whose latest checkpoint the test sets."""

    checkpoint: Checkpoint | None = None


@pytest.mark.parametrize("status, freed", [(Trial.TERMINATED, True), (Trial.RUNNING, False)])
def test_a_close_an_earlier_driver_left_frees_tunes_copy_only_of_a_trial_tune_ended(
    store, tmp_path, status, freed
):
    """A killed driver's journal holds a close the next writer applies; Tune's copy of that
    trial's checkpoint may go only when Tune's restored state ended the trial too (else Tune
    restarts it from that checkpoint)."""
    tracker, parent, base, journal = store
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder / BEST, {"config": {}, "model": {}, "epoch": 1, "metrics": {"segm_AP50": 0.5}})
    writes = [
        ["start", {"trial_id": "t_00001", "name": "t", "config": {}}],
        [
            "close",
            {
                "trial_id": "t_00001",
                "name": "t",
                "config": {},
                "status": "KILLED",
                "error": None,
                "checkpoint": str(folder.resolve()),
            },
        ],
    ]
    journal.mkdir()
    (journal / "1.jsonl").write_text("".join(json.dumps(w) + "\n" for w in writes))
    callback = logger(tracker, parent, base, journal)
    assert not callback._cleanup and child(tracker, "t_00001").info.status == "KILLED"
    t = CheckpointedTrial("train_trial", config={}, trial_id="t_00001", stub=True)
    t.checkpoint = Checkpoint(str(folder))
    t.set_status(status)
    callback.on_step_begin(0, [t])
    assert bool(callback._cleanup) is freed


@pytest.mark.slow
def test_setup_waits_for_a_store_that_is_down_then_reads_the_searchs_runs(
    tmp_path, easy_root, monkeypatch, caplog
):
    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # the driver's: a refused connection fails fast
        monkeypatch.setenv(key, value)
    port = free_port()
    servers = [start_server(tmp_path, port)]
    try:
        tracker = Tracker(f"http://127.0.0.1:{port}")
        parent = tracker.start_run("e", "s1")
        base = config_to_dict(load_config(TRIALS / "demo.yaml", [f"data.root={easy_root}"]))
        first = logger(tracker, parent, base, tmp_path / "writes")
        t = trial("t_00001")
        first.on_trial_start(0, [t], t)
        report(first, t, 1)
        assert first.writer.close(WAIT_S)[0]  # the driver stopped: its trial's run stays open
        stop(servers[0])  # and the store went down before the next driver's setup
        back = threading.Timer(5.0, lambda: servers.append(start_server(tmp_path, port)))
        back.start()
        with caplog.at_level(logging.WARNING, logger="search.mlflow_callback"):
            second = logger(tracker, parent, base, tmp_path / "writes")
        back.join()
        assert "reading the search's runs again" in caplog.text
        assert second._runs == {"t_00001"} and second._closed == set()
        assert second.writer.close(WAIT_S)[0]
    finally:
        for writer in MlflowWriter._open.values():
            if not writer.closed:
                writer.abandon()
        MlflowWriter._open.clear()
        for server in servers:
            stop(server)
