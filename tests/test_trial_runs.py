"""The MLflow writes of a search's trials applied in this process (as the MLflow writer process
applies them) to a real MLflow store on SQLite, with stores that fail on purpose: a retried start,
``--keep-top``'s uploads and drops, a close retried after the store went down."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cellseg.checkpoint import BEST, save_checkpoint
from cellseg.config import config_to_dict, load_config
from cellseg.tracking import CHECKPOINT_ARTIFACT, CHECKPOINT_DROPPED_TAG, Tracker
from search.mlflow_outbox import Outbox
from search.trial_runs import TRIAL_TAG, RunsSpec, TrialRuns

TRIALS = Path(__file__).resolve().parents[1] / "trials"


@pytest.fixture
def spec(tmp_path, easy_root) -> RunsSpec:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = load_config(TRIALS / "demo.yaml", [f"data.root={easy_root}"])
    return RunsSpec(
        tracking_uri=tracker.uri,
        experiment="e",
        parent_run_id=tracker.start_run("e", "s1"),
        base=config_to_dict(base),
        metric="segm_AP50",
        search_name="s1",
    )


def run_of(spec: RunsSpec, trial_id: str):
    tracker = Tracker(spec.tracking_uri)
    [run] = MlflowClient(spec.tracking_uri).search_runs(
        [tracker.experiment_id("e")], f"tags.`{TRIAL_TAG}` = '{trial_id}'"
    )
    return run


def kept_checkpoint(spec: RunsSpec, run_id: str) -> bool:
    return bool(MlflowClient(spec.tracking_uri).list_artifacts(run_id, CHECKPOINT_ARTIFACT))


def checkpoint(folder: Path, value: float) -> str:
    """A checkpoint folder whose best.pt scored ``value``, as the close names it."""
    save_checkpoint(folder / BEST, {"config": {}, "model": {}, "epoch": 1, "metrics": {"segm_AP50": value}})
    return str(folder.resolve())


def one_epoch(outbox: Outbox, trial_id: str, value: float, folder: Path, status: str = "KILLED") -> None:
    """A trial's writes: start, its first epoch, its close with a checkpoint that scored ``value``."""
    config = {"optim.lr": value}
    outbox.put("start", trial_id=trial_id, name=trial_id, config=config)
    outbox.put("result", trial_id=trial_id, epoch=1, metrics={"epoch": 1.0, "segm_AP50": value}, node_id=None)
    outbox.put(
        "close",
        trial_id=trial_id,
        name=trial_id,
        config=config,
        status=status,
        error="boom" if status == "FAILED" else None,
        checkpoint=checkpoint(folder, value),
    )


class LosesOneAnswer(Tracker):
    """A store whose connection drops once, after a run was created but before its params."""

    dropped = False

    def log_params(self, run_id: str, params: dict) -> None:
        if not self.dropped:
            self.dropped = True
            raise ConnectionError("connection reset")
        super().log_params(run_id, params)


def test_a_start_retried_after_a_lost_answer_finds_the_run_it_created(spec):
    runs = TrialRuns(spec, LosesOneAnswer(spec.tracking_uri))
    outbox = Outbox(runs.apply)
    assert not outbox.put("start", trial_id="t_00001", name="t", config={})  # queued for a retry
    assert runs.tracker.dropped and outbox.flush(force=True)
    outbox.put("result", trial_id="t_00001", epoch=1, metrics={"segm_AP50": 0.1}, node_id=None)
    assert run_of(spec, "t_00001").data.metrics["segm_AP50"] == 0.1  # one run: run_of asserts it


class CountsUploads(Tracker):
    """A store that records which runs had a checkpoint uploaded."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.uploaded: list[str] = []

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        if artifact_path == CHECKPOINT_ARTIFACT:
            self.uploaded.append(run_id)
        super().log_artifact(run_id, path, artifact_path)


def test_with_keep_top_a_trial_that_ends_outside_the_top_never_uploads_its_checkpoint(spec, tmp_path):
    """--keep-top 1: the first trial uploads, the better second pushes it out, the worse third is
    tagged dropped before any upload; only the best keeps checkpoint/best.pt."""
    keep_one = RunsSpec(**{**vars(spec), "keep_top": 1})
    runs = TrialRuns(keep_one, CountsUploads(spec.tracking_uri))
    outbox = Outbox(runs.apply)
    ids = {}
    for number, value in enumerate((0.5, 0.9, 0.3), 1):
        one_epoch(outbox, f"t_{number:05d}", value, tmp_path / f"checkpoint_{number}")
        ids[value] = run_of(spec, f"t_{number:05d}").info.run_id
    assert runs.tracker.uploaded == [ids[0.5], ids[0.9]]
    client = MlflowClient(spec.tracking_uri)
    for value, run_id in ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.metrics["best_segm_AP50"] == value
        assert (
            kept_checkpoint(spec, run_id) == (value == 0.9) == (CHECKPOINT_DROPPED_TAG not in run.data.tags)
        )
    assert (
        client.get_run(ids[0.3]).data.tags[CHECKPOINT_DROPPED_TAG]
        == "not among the 1 best trials by segm_AP50"
    )


def test_a_retried_trial_that_ends_outside_the_top_loses_the_checkpoint_its_failure_uploaded(spec, tmp_path):
    """A FAILED trial's close uploads its checkpoint (failed runs are not ranked) and frees nothing
    in Tune's storage; when its retry ends outside the --keep-top best, that copy goes too."""
    runs = TrialRuns(RunsSpec(**{**vars(spec), "keep_top": 1}))
    outbox = Outbox(runs.apply)
    one_epoch(outbox, "t_00001", 0.9, tmp_path / "best")
    one_epoch(outbox, "t_00002", 0.3, tmp_path / "retried", status="FAILED")
    run = run_of(spec, "t_00002")
    assert run.info.status == "FAILED" and kept_checkpoint(spec, run.info.run_id)
    assert runs.apply("close", **failed_close(tmp_path / "retried")) is None  # kept for a restart
    one_epoch(outbox, "t_00002", 0.3, tmp_path / "retried")  # Tune restarted it from its checkpoint
    run = run_of(spec, "t_00002")
    assert run.info.status == "KILLED" and CHECKPOINT_DROPPED_TAG in run.data.tags
    assert not kept_checkpoint(spec, run.info.run_id)


def failed_close(folder: Path) -> dict:
    return dict(
        trial_id="t_00002",
        name="t",
        config={"optim.lr": 0.3},
        status="FAILED",
        error="boom",
        checkpoint=str(folder.resolve()),
    )


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


def test_a_close_that_finds_the_store_down_when_ranking_is_retried_not_dropped(spec, tmp_path):
    runs = TrialRuns(RunsSpec(**{**vars(spec), "keep_top": 1}), DownAtOneRead(spec.tracking_uri))
    outbox = Outbox(runs.apply)
    one_epoch(outbox, "t_00001", 0.5, tmp_path / "checkpoint")
    assert not runs.tracker.down and outbox.pending  # queued for a retry
    assert outbox.flush(force=True)
    run = run_of(spec, "t_00001")
    assert run.info.status == "KILLED" and kept_checkpoint(spec, run.info.run_id)


def test_a_close_frees_tunes_copy_of_the_checkpoint_and_a_restored_writer_skips_logged_epochs(spec, tmp_path):
    runs = TrialRuns(spec)
    outbox = Outbox(runs.apply)
    one_epoch(outbox, "t_00001", 0.5, tmp_path / "checkpoint")
    again = TrialRuns(spec)  # a later writer, after a crash: the same writes applied again
    again.load()
    assert again.runs == runs.runs and again.logged_epoch == {"t_00001": 1}
    uri = checkpoint(tmp_path / "checkpoint", 0.5)
    assert (
        again.apply(
            "close", **{**failed_close(tmp_path / "checkpoint"), "trial_id": "t_00001", "status": "KILLED"}
        )
        == uri
    )
    again.apply("result", trial_id="t_00001", epoch=1, metrics={"segm_AP50": 0.0}, node_id=None)
    history = MlflowClient(spec.tracking_uri).get_metric_history(
        run_of(spec, "t_00001").info.run_id, "segm_AP50"
    )
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_a_close_whose_checkpoint_is_gone_ends_the_run_without_blocking_later_writes(spec, tmp_path):
    runs = TrialRuns(spec)
    outbox = Outbox(runs.apply)
    outbox.put("start", trial_id="t_00001", name="t", config={})
    gone = str(tmp_path / "removed")
    assert outbox.put(
        "close", trial_id="t_00001", name="t", config={}, status="KILLED", error=None, checkpoint=gone
    )
    assert run_of(spec, "t_00001").info.status == "KILLED" and not outbox.pending
