"""Trial faults in a real search: a NaN loss, an error at epoch k, an out-of-memory error and a
dying worker are FAILED in Ray and in MLflow with their error while the search goes on; with
--max-failures the trial is retried from its last checkpoint. Bad MLflow or storage settings fail
before any trial starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from search.faults import COUNT_ENV, DIR_ENV, FAULT_ENV, InjectedFault, fault_from_env, no_fault, parse_fault
from search.run import main as search_main
from searchutil import epochs_of, free_port, search_args, search_runs

pytestmark = pytest.mark.slow


def run_search(
    tmp_path: Path, data: Path, tiny_search: dict, *extra: str, env: dict[str, str] | None = None
) -> tuple[int, tuple]:
    """A tiny search in this process, its Ray workers started with ``env``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env or {}})
    try:
        code = search_main(search_args(data, tiny_search, tmp_path / "storage", uri, "faults", "f1", *extra))
    finally:
        ray.shutdown()
    return code, search_runs(uri, "faults", "f1")


def result_epochs(storage: Path, run) -> list[int]:
    """Epochs of every result Tune recorded for the trial of ``run``, in order."""
    path = next(storage.glob(f"f1/trial_{run.data.tags['ray.trial_id']}/result.json"))
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_nan_loss_fails_its_trial_with_the_error_and_the_search_goes_on(tmp_path, easy_root, tiny_search):
    space = tmp_path / "space.yaml"
    space.write_text(
        "params:\n  optim.lr: {choice: [1.0e-3, 1.0e+4]}\nbaselines: [explodes.yaml, sane.yaml]\n"
    )
    (tmp_path / "explodes.yaml").write_text("optim: {lr: 1.0e+4}\n")
    (tmp_path / "sane.yaml").write_text("optim: {lr: 1.0e-3}\n")
    code, (client, parents, children) = run_search(
        tmp_path,
        easy_root,
        {**tiny_search, "space": space},
        "--num-samples",
        "2",
        "--max-epochs",
        "2",
        "--grace-period",
        "2",  # a stray drill without --fault-drill:
        env={FAULT_ENV: "error@1", DIR_ENV: str(tmp_path / "tokens")},
    )
    assert code == 0 and parents[0].info.status == "FINISHED"
    assert not (tmp_path / "tokens").exists(), "a trial read the drill without --fault-drill"
    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    failed, sane = by_lr[1.0e4], by_lr[1.0e-3]
    assert failed.info.status == "FAILED"
    assert "NonFiniteLossError" in failed.data.tags["error"]
    assert "non-finite loss" in failed.data.tags["error"]
    assert sane.info.status == "FINISHED" and epochs_of(client, sane) == [1, 2]


def test_error_at_epoch_k_fails_that_trial_only(tmp_path, easy_root, tiny_search):
    code, (client, _, children) = run_search(
        tmp_path,
        easy_root,
        tiny_search,
        "--num-samples",
        "2",
        "--max-epochs",
        "2",
        "--grace-period",
        "2",
        "--fault-drill",
        env={FAULT_ENV: "error@2", DIR_ENV: str(tmp_path / "tokens"), COUNT_ENV: "1"},
    )
    assert code == 0
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "InjectedFault: injected error fault after epoch 2" in failed.data.tags["error"]
    assert epochs_of(client, failed) == [1], "epoch 1 was reported before the fault"
    assert "checkpoint" in {a.path for a in client.list_artifacts(failed.info.run_id)}


@pytest.mark.parametrize("kind, error", [("oom", "OutOfMemoryError"), ("exit", "actor died unexpectedly")])
def test_max_failures_retries_the_trial_from_its_last_checkpoint(
    tmp_path, easy_root, tiny_search, kind, error
):
    code, (client, _, children) = run_search(
        tmp_path,
        easy_root,
        tiny_search,
        "--num-samples",
        "1",
        "--max-epochs",
        "3",
        "--max-failures",
        "1",
        "--fault-drill",
        env={FAULT_ENV: f"{kind}@2", DIR_ENV: str(tmp_path / "tokens")},
    )
    assert code == 0
    [child] = children
    assert child.info.status == "FINISHED"
    assert child.data.tags["ray.num_failures"] == "1"
    assert error in child.data.tags["last_error"]
    assert epochs_of(client, child) == [1, 2, 3]
    assert result_epochs(tmp_path / "storage", child) == [1, 2, 3], (
        "the retry started over instead of continuing after epoch 1"
    )


def test_fault_spec_is_checked():
    assert parse_fault("oom@2") == ("oom", 2)
    for bad in ("oom", "boom@2", "error@0", "error@x"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_fault(bad)


def test_a_trial_injector_is_a_no_op_unless_a_drill_is_set_and_fires_once(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_from_env() is no_fault
    monkeypatch.setenv(FAULT_ENV, "error@2")
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "tokens"))
    monkeypatch.setenv(COUNT_ENV, "1")
    inject = fault_from_env()
    inject(1)
    with pytest.raises(InjectedFault, match="after epoch 2"):
        inject(2)
    fault_from_env()(2)  # the only token is taken: a retried trial trains on
    monkeypatch.setenv(FAULT_ENV, "error@two")
    with pytest.raises(ValueError, match=FAULT_ENV):
        fault_from_env()


def test_malformed_fault_spec_fails_before_any_trial(tmp_path, easy_root, tiny_search, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "oom@two")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (
        search_main(
            search_args(easy_root, tiny_search, tmp_path / "storage", uri, "x", "f1", "--fault-drill")
        )
        == 2
    )
    assert f"{FAULT_ENV}='oom@two': expected <kind>@<epoch>" in capsys.readouterr().err
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


def test_unreachable_mlflow_fails_before_any_trial(tmp_path, easy_root, tiny_search, capsys, monkeypatch):
    for key in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(key, raising=False)  # restored after the test; main sets defaults
    uri = f"http://127.0.0.1:{free_port()}"
    code = search_main(search_args(easy_root, tiny_search, tmp_path / "storage", uri, "x", "u1"))
    assert code == 2
    assert f"MLflow tracking store {uri} is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


def test_missing_dataset_fails_before_any_trial(tmp_path, tiny_search, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = search_args(tmp_path / "nowhere", tiny_search, tmp_path / "storage", uri, "x", "d1")
    assert search_main(args) == 2
    assert f"{tmp_path / 'nowhere'}: dataset folder not found" in capsys.readouterr().err
    assert not (tmp_path / "storage").exists() and not ray.is_initialized()


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "is not writable"),
        (("--min-free-gb", "1e9"), "GB free, below --min-free-gb"),
    ],
)
def test_unusable_storage_fails_before_any_trial(tmp_path, easy_root, tiny_search, capsys, extra, message):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    storage = not_a_folder / "storage" if not extra else tmp_path / "storage"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = search_args(easy_root, tiny_search, storage, uri, "x", "s1", *extra)
    assert search_main(args) == 2
    err = capsys.readouterr().err
    assert f"storage {storage}" in err and message in err
    _, parents, _ = search_runs(uri, "x", "s1")
    assert not parents and not ray.is_initialized()


def test_a_search_where_no_trial_succeeds_fails_naming_the_first_error(
    tmp_path, easy_root, tiny_search, capsys
):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  optim.lr: {choice: [1.0e+4, 2.0e+4]}\nbaselines: [explodes.yaml]\n")
    (tmp_path / "explodes.yaml").write_text("optim: {lr: 1.0e+4}\n")
    code, (_, [parent], [child]) = run_search(
        tmp_path, easy_root, {**tiny_search, "space": space}, "--num-samples", "1", "--max-epochs", "1"
    )
    assert code == 1
    error = capsys.readouterr().err
    assert "search: failed: no trial succeeded: 1 of 1 failed" in error
    assert "NonFiniteLossError" in error and child.data.tags["ray.trial_id"] in error
    assert parent.info.status == "FAILED" and "no trial succeeded" in parent.data.tags["error"]
    assert child.info.status == "FAILED"
