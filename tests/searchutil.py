"""Helpers for the search tests: driving search/run.py and reading what it wrote to MLflow."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import ray
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from search.run import SEARCH_TAG

RUN_PY = Path(__file__).resolve().parents[1] / "search" / "run.py"


def search_args(
    data: Path, tiny_search: dict[str, Path], storage: Path, uri: str, experiment: str, name: str, *extra: str
) -> list[str]:
    """run.py arguments for a tiny search on ``data``."""
    return [
        "--data",
        str(data),
        "--base",
        str(tiny_search["base"]),
        "--space",
        str(tiny_search["space"]),
        "--storage",
        str(storage),
        "--tracking-uri",
        uri,
        "--experiment",
        experiment,
        "--name",
        name,
        *extra,
    ]


def start_driver(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """run.py in its own process group (so that a test can kill it and its Ray) logging to ``log``,
    with Ctrl-C (SIGINT) raising KeyboardInterrupt as in a terminal."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # A shell that starts the tests in the background ignores SIGINT, and an ignored signal
        # stays ignored across exec (a handler does not): the driver would not see the drill's Ctrl-C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(RUN_PY), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def search_runs(uri: str, experiment: str, name: str) -> tuple[MlflowClient, list[Run], list[Run]]:
    """The client, the parent run(s) tagged with search ``name``, and their child runs."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get(SEARCH_TAG) == name]
    ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]
    return client, parents, children


def epochs_of(client: MlflowClient, run: Run, metric: str = "segm_AP50") -> list[int]:
    """The steps (epochs) at which ``metric`` was logged, sorted, repeats kept."""
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


def tied_at(client: MlflowClient, runs: list[Run], epochs: list[int], metric: str = "segm_AP50") -> bool:
    """Whether the runs that logged ``metric`` at each of ``epochs`` all logged the same value
    there. ASHA stops a trial only strictly below its rung's cutoff, so such a tie at every rung
    (all 0.0 after an epoch or two on some CPUs) stops none."""
    scores = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, metric)} for r in runs]
    return all(len({s[e] for s in scores if e in s}) <= 1 for e in epochs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_for_test_trainables(num_cpus: int = 1) -> Iterator[None]:
    """A local Ray whose workers import trainables defined in the test modules (tests/ on their
    path); shut down after the block."""
    tests = Path(__file__).resolve().parent
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(tests)}})
    try:
        yield
    finally:
        ray.shutdown()


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over a SQLite file and an artifact folder in ``folder``."""
    log = open(folder / f"server-{port}.log", "a")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: _healthy(port), 120, "the MLflow server to answer")
    return server


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
