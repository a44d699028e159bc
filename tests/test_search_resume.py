"""A search whose driver dies (SIGKILL) or is interrupted (Ctrl-C) at a chosen point finishes with
--resume: every trial once in MLflow, closed as Tune ended it, with its epochs, best metric and
checkpoint. The driver stops itself through its drill (search/driver_drill.py), not by timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest

from search.driver_drill import DRILL_ENV
from search.searcher import TRIAL_ATTR
from search.study_file import JOURNAL_FILE, open_study_storage
from searchutil import RUN_PY, epochs_of, search_args, search_runs, start_driver

pytestmark = pytest.mark.slow

EPOCHS = 2


@pytest.mark.parametrize(
    "drill, code, parent_status",
    [
        ("kill@result#3", -signal.SIGKILL, "RUNNING"),  # a trial's epoch logged, the other mid-epoch
        ("kill@trial-end", -signal.SIGKILL, "RUNNING"),  # Tune ended a trial, MLflow not yet
        ("kill@upload", -signal.SIGKILL, "RUNNING"),  # during the close: checkpoint uploaded
        ("kill@closed", -signal.SIGKILL, "RUNNING"),  # MLflow closed the trial, Tune's state not yet
        ("int@result#3", 130, "KILLED"),  # Ctrl-C
    ],
)
def test_a_stopped_driver_resumes_without_losing_or_duplicating_trials(
    tmp_path, easy_root, tiny_search, drill, code, parent_status
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    args = search_args(
        easy_root,
        tiny_search,
        storage,
        uri,
        "resume",
        "r1",
        "--num-samples",
        "2",
        "--max-epochs",
        str(EPOCHS),
        "--grace-period",
        str(EPOCHS),
    )
    env = {**os.environ, "RAY_ADDRESS": "local"}  # never another test's Ray
    driver = start_driver(args, tmp_path / "first.log", env={**env, DRILL_ENV: f"r1:{drill}"})
    try:
        driver.wait(timeout=600)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # what the drill's process may have left
        except ProcessLookupError:
            pass
    log = (tmp_path / "first.log").read_text()
    assert driver.returncode == code, log[-3000:]
    _, [parent], _ = search_runs(uri, "resume", "r1")
    assert parent.info.status == parent_status
    if code == 130:
        assert "interrupted; the parent run is KILLED" in log and "--resume --name r1" in log

    resumed = subprocess.run(
        [sys.executable, str(RUN_PY), *args, "--resume"], capture_output=True, text=True, timeout=900, env=env
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client, parents, children = search_runs(uri, "resume", "r1")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags["ray.trial_id"] for c in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert epochs_of(client, child) == list(range(1, EPOCHS + 1)), child.info.run_name
        assert "best_segm_AP50" in child.data.metrics
        assert any(a.path == "checkpoint" for a in client.list_artifacts(child.info.run_id))
    study = optuna.load_study(study_name="r1", storage=open_study_storage(storage / "r1" / JOURNAL_FILE))
    told = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert sorted(t.user_attrs[TRIAL_ATTR] for t in told) == sorted(trial_ids), (
        "Optuna lost or doubled a trial across the resume"
    )
    for trial in told:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
