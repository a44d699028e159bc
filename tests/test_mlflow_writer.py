"""The MLflow writer process with a real MLflow store on SQLite: writes journaled before they are
sent, so a writer killed with its driver loses none; a writer whose driver went away finishes;
an older version's outbox file is applied. With a real `mlflow server` that is down when the
writer starts: the writer waits for it instead of stopping."""

from __future__ import annotations

import json
import signal

import pytest
from mlflow.tracking import MlflowClient

from cellseg.tracking import Tracker
from search.mlflow_writer import OLD_OUTBOX, MlflowWriter, adopt_outbox, segments
from search.run import MLFLOW_HTTP_DEFAULTS
from search.trial_runs import TRIAL_TAG, RunsSpec
from searchutil import free_port, start_server, stop

WAIT_S = 60.0


@pytest.fixture
def spec(tmp_path, easy_root) -> RunsSpec:
    return make_spec(f"sqlite:///{tmp_path / 'mlflow.db'}", easy_root)


def make_spec(uri: str, root) -> RunsSpec:
    tracker = Tracker(uri)
    return RunsSpec(
        tracking_uri=tracker.uri,
        experiment="e",
        parent_run_id=tracker.start_run("e", "s1"),
        base={"data": {"root": str(root)}},
        metric="segm_AP50",
        search_name="s1",
    )


def writes(trial_id: str, epochs: int) -> list[tuple[str, dict]]:
    return [
        ("start", {"trial_id": trial_id, "name": trial_id, "config": {}}),
        *(
            (
                "result",
                {"trial_id": trial_id, "epoch": e, "metrics": {"epoch": e, "loss": 1 / e}, "node_id": None},
            )
            for e in range(1, epochs + 1)
        ),
    ]


def logged(spec: RunsSpec, trial_id: str) -> list[int]:
    client = MlflowClient(spec.tracking_uri)
    [run] = client.search_runs(
        [Tracker(spec.tracking_uri).experiment_id("e")], f"tags.`{TRIAL_TAG}` = '{trial_id}'"
    )
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))


def test_writes_of_a_writer_killed_with_its_driver_are_applied_by_the_next(spec, tmp_path):
    folder = tmp_path / "writes"
    first = MlflowWriter(spec, folder)
    for op, kwargs in writes("t_00001", 3):
        first.put(op, **kwargs)
    first.process.send_signal(signal.SIGKILL)  # still starting: nothing applied
    first.process.wait()
    assert len(segments(folder)) == 1
    second = MlflowWriter(spec, folder)
    for op, kwargs in writes("t_00002", 1):
        second.put(op, **kwargs)
    assert second.close(WAIT_S)[0]
    assert logged(spec, "t_00001") == [1, 2, 3] and logged(spec, "t_00002") == [1]
    assert segments(folder) == [] and not list(folder.glob("*.applied"))


def test_a_writer_whose_driver_went_away_applies_what_it_journaled_and_ends(spec, tmp_path):
    folder = tmp_path / "writes"
    writer = MlflowWriter(spec, folder)
    *sent, (op, kwargs) = writes("t_00001", 3)
    for op_sent, kwargs_sent in sent:
        writer.put(op_sent, **kwargs_sent)
    writer._journal.write((json.dumps([op, kwargs]) + "\n").encode())  # the driver died after
    writer._journal.flush()  # journaling its last write, before sending it
    writer.process.stdin.close()  # as when the driver's process ends
    assert writer.process.wait(timeout=WAIT_S) == 0
    assert logged(spec, "t_00001") == [1, 2, 3] and segments(folder) == []


def test_an_older_drivers_outbox_file_is_applied_first(spec, tmp_path):
    (tmp_path / OLD_OUTBOX).write_text(json.dumps(writes("t_00001", 2)))
    adopt_outbox(tmp_path, tmp_path / "writes")
    assert not (tmp_path / OLD_OUTBOX).exists()
    writer = MlflowWriter(spec, tmp_path / "writes")
    assert writer.close(WAIT_S)[0]
    assert logged(spec, "t_00001") == [1, 2] and segments(tmp_path / "writes") == []


@pytest.mark.slow
def test_a_writer_started_while_the_server_is_down_waits_for_it(tmp_path, easy_root, monkeypatch):
    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # the driver's: a refused connection fails fast
        monkeypatch.setenv(key, value)
    port = free_port()
    servers = [start_server(tmp_path, port)]
    writers: list[MlflowWriter] = []
    try:
        spec = make_spec(f"http://127.0.0.1:{port}", easy_root)
        start, *results = writes("t_00001", 3)
        writers.append(MlflowWriter(spec, tmp_path / "writes"))
        for op, kwargs in [start, results[0]]:
            writers[0].put(op, **kwargs)
        assert writers[0].close(WAIT_S)[0]
        stop(servers[0])  # down between a resumed driver's start and its writer's
        writers.append(MlflowWriter(spec, tmp_path / "writes"))
        for op, kwargs in [start, *results[1:]]:  # the trial restarted: its run is reopened
            writers[1].put(op, **kwargs)
        assert writers[1].wait(0.0) == (False, [])  # its first try at the store failed; it lives on
        servers.append(start_server(tmp_path, port))
        assert writers[1].close(WAIT_S)[0]
        assert logged(spec, "t_00001") == [1, 2, 3]  # one run: the writer knew it
        assert segments(tmp_path / "writes") == []
    finally:
        for writer in writers:
            if not writer.closed:
                writer.abandon()
        for server in servers:
            stop(server)
