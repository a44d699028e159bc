"""A search whose driver is killed with SIGKILL finishes with --resume, nothing lost or doubled."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest

from search.searcher import TRIAL_ATTR
from searchutil import RUN_PY, epochs_of, search_args, search_runs, start_driver, wait_for

pytestmark = pytest.mark.slow


def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path, easy_root, tiny_search):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    args = search_args(easy_root, tiny_search, storage, uri, "resume", "r1",
                       "--num-samples", "3", "--grace-period", "3")
    driver = start_driver(args, tmp_path / "first.log")
    try:
        wait_for(lambda: any(storage.glob("r1/trial_*/checkpoint_000001")), 600,
                 "a trial's second checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    client, _, children = search_runs(uri, "resume", "r1")
    assert any(r.info.status == "RUNNING" for r in children), \
        "the kill came too late: nothing was left to resume"

    resumed = subprocess.run([sys.executable, str(RUN_PY), *args, "--resume"], capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client, parents, children = search_runs(uri, "resume", "r1")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags["ray.trial_id"] for c in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        assert epochs_of(client, child) == [1, 2, 3], child.info.run_name
        assert any(a.path == "checkpoint" for a in client.list_artifacts(child.info.run_id))
    for trial_id in trial_ids:
        assert list(storage.glob(f"r1/trial_{trial_id}/checkpoint_*/best.pt"))
    study = optuna.load_study(study_name="r1", storage=f"sqlite:///{storage / 'r1' / 'optuna.db'}")
    told = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert sorted(t.user_attrs[TRIAL_ATTR] for t in told) == sorted(trial_ids), \
        "Optuna lost or doubled a trial across the resume"
    for trial in told:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert sorted(trial.intermediate_values) == [1, 2, 3]
