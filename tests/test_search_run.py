"""The driver's steps one by one, without Ray or a subprocess (MLflow is real, on SQLite)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cellseg.config import ConfigError
from cellseg.data import DataError
from cellseg.tracking import Tracker, TrackingError
from search.run import (REPO, SEARCH_TAG, SIGINT_ENV, STRICT_METRIC_ENV, check_fault_drill, load_base,
                        metric_every_epoch, open_parent_run, search_name, storage_paths,
                        tune_environment, data_root)
from search.space import load_space


def test_a_search_name_is_made_unless_given_and_resume_needs_one():
    assert search_name("s1", resume=True) == "s1"
    assert search_name(None, resume=False).startswith("search-")
    with pytest.raises(ConfigError, match="--resume needs --name"):
        search_name(None, resume=True)


def test_a_malformed_fault_drill_is_a_config_error():
    check_fault_drill(None)
    check_fault_drill("oom@2")
    with pytest.raises(ConfigError, match="CELLSEG_FAULT='oom@two'"):
        check_fault_drill("oom@two")


def test_a_dataset_without_training_images_fails_naming_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        data_root(str(tmp_path))


def test_the_base_config_takes_the_data_and_max_epochs(tiny_search, easy_root):
    cfg = load_base(tiny_search["base"], easy_root, max_epochs=5)
    assert cfg.data.root == str(easy_root) and cfg.train.epochs == 5
    assert load_base(tiny_search["base"], easy_root, max_epochs=None).train.epochs == 3


def test_the_metric_is_every_epoch_unless_validation_may_be_skipped(tmp_path, tiny_search, easy_root):
    base = load_base(tiny_search["base"], easy_root, None)
    space = load_space(tiny_search["space"], base)
    assert metric_every_epoch(base, space)
    every2 = tmp_path / "base.yaml"
    every2.write_text(tiny_search["base"].read_text().replace("epochs: 3", "epochs: 4\n  eval_every: 2"))
    assert not metric_every_epoch(load_base(every2, easy_root, None), space)
    searched = tmp_path / "space.yaml"
    searched.write_text("params:\n  train.eval_every: {choice: [1, 2]}\n")
    assert not metric_every_epoch(base, load_space(searched, base))


def test_local_and_remote_storage_paths(tmp_path):
    assert storage_paths(str(tmp_path / "st"), "s1") == (str(tmp_path / "st"), tmp_path / "st" / "s1")
    assert storage_paths("s3://bucket/x", "s1") == ("s3://bucket/x", REPO / "runs" / "remote" / "s1")


@pytest.mark.parametrize("before", [None, "0"])
def test_tunes_environment_settings_are_scoped_to_the_block(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(STRICT_METRIC_ENV, raising=False)
    else:
        monkeypatch.setenv(STRICT_METRIC_ENV, before)
    monkeypatch.delenv(SIGINT_ENV, raising=False)
    with tune_environment(strict_metrics=True):
        assert os.environ.get(STRICT_METRIC_ENV) == before and os.environ[SIGINT_ENV] == "1"
    with pytest.raises(KeyboardInterrupt):
        with tune_environment(strict_metrics=False):
            assert os.environ[STRICT_METRIC_ENV] == "1" and os.environ[SIGINT_ENV] == "1"
            raise KeyboardInterrupt
    assert os.environ.get(STRICT_METRIC_ENV) == before and SIGINT_ENV not in os.environ


def test_the_parent_run_is_created_once_and_found_again_on_resume(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kwargs = dict(experiment="e", name="s1", params={"num_samples": 3},
                  tags={"cellseg.source": "search-parent"}, texts={"search/space.yaml": "params: {}\n"})
    with pytest.raises(TrackingError, match="no search named 's1'"):
        open_parent_run(tracker, resume=True, **kwargs)
    run_id = open_parent_run(tracker, resume=False, **kwargs)
    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)
    assert run.data.tags[SEARCH_TAG] == "s1" and run.data.params == {"num_samples": "3"}
    assert [a.path for a in client.list_artifacts(run_id, "search")] == ["search/space.yaml"]
    with pytest.raises(TrackingError, match="exists already"):
        open_parent_run(tracker, resume=False, **kwargs)
    tracker.end_run(run_id, "KILLED")
    assert open_parent_run(tracker, resume=True, **kwargs) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
