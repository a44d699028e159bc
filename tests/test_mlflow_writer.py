"""The MLflow writer process with a real MLflow store on SQLite: writes journaled before they are
sent, so a writer killed with its driver loses none; a writer whose driver went away finishes;
an older version's outbox file is applied."""

from __future__ import annotations

import json
import signal

import pytest
from mlflow.tracking import MlflowClient

from cellseg.tracking import Tracker
from search.mlflow_writer import OLD_OUTBOX, MlflowWriter, adopt_outbox, segments
from search.trial_runs import TRIAL_TAG, RunsSpec

WAIT_S = 60.0


@pytest.fixture
def spec(tmp_path, easy_root) -> RunsSpec:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return RunsSpec(
        tracking_uri=tracker.uri,
        experiment="e",
        parent_run_id=tracker.start_run("e", "s1"),
        base={"data": {"root": str(easy_root)}},
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
