"""A search whose driver is killed with SIGKILL finishes with --resume, nothing lost or doubled."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.mlflow_callback import TRIAL_TAG
from search.run import SEARCH_TAG

pytestmark = pytest.mark.slow

RUN_PY = Path(__file__).resolve().parents[1] / "search" / "run.py"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path, easy_root, tiny_search):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    args = [sys.executable, str(RUN_PY), "--data", str(easy_root), "--base", str(tiny_search["base"]),
            "--space", str(tiny_search["space"]), "--num-samples", "3", "--grace-period", "3",
            "--storage", str(storage), "--tracking-uri", uri, "--experiment", "resume",
            "--name", "r1"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any(storage.glob("r1/trial_*/checkpoint_000001")), 600,
                 "a trial's second checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("resume")
    unfinished = [r for r in client.search_runs([experiment.experiment_id])
                  if r.info.status == "RUNNING"]
    assert unfinished, "the kill came too late: nothing was left to resume"

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get(SEARCH_TAG) == "r1"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    trial_ids = [c.data.tags[TRIAL_TAG] for c in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "segm_AP50")]
        assert sorted(steps) == [1, 2, 3], f"{child.info.run_name}: epochs {steps}"
        assert any(a.path == "checkpoint" for a in client.list_artifacts(child.info.run_id))
    for trial_id in trial_ids:
        assert list(storage.glob(f"r1/trial_{trial_id}/checkpoint_*/best.pt"))
