"""A real `mlflow server` killed and restarted in the middle of a search: nothing is lost.

The driver's writes are queued by its MLflow writer process while the server is away and applied once it is
back; every trial is recorded once, with every epoch once.
"""

from __future__ import annotations

import pytest

from search.mlflow_writer import JOURNAL, segments
from searchutil import (
    epochs_of,
    free_port,
    search_args,
    search_runs,
    start_driver,
    start_server,
    stop,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_server_restart_mid_search_loses_nothing(tmp_path, easy_root, tiny_search):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    log = tmp_path / "driver.log"
    driver = start_driver(
        search_args(
            easy_root,
            tiny_search,
            tmp_path / "storage",
            uri,
            "outage",
            "o1",
            "--num-samples",
            "3",
            "--grace-period",
            "3",
        ),
        log,
    )
    try:
        wait_for(
            lambda: any(epochs_of(*pair) for pair in _client_children(uri)),
            600,
            "a trial's first epoch in MLflow",
        )
        stop(server)
        wait_for(
            lambda: "MLflow unavailable" in log.read_text() or driver.poll() is not None,
            300,
            "the driver to queue a write while the server is down",
        )
        server = start_server(tmp_path, port)
        assert driver.wait(timeout=900) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "MLflow unavailable" in text and "MLflow reachable again" in text
        client, parents, children = search_runs(uri, "outage", "o1")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 3
        assert len({c.data.tags["ray.trial_id"] for c in children}) == 3
        for child in children:
            assert child.info.status == "FINISHED"
            assert epochs_of(client, child) == [1, 2, 3], child.info.run_name
            assert "checkpoint" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert segments(tmp_path / "storage" / "o1" / JOURNAL) == []  # all applied
    finally:
        stop(driver)
        stop(server)


def _client_children(uri: str) -> list:
    client, _, children = search_runs(uri, "outage", "o1")
    return [(client, c) for c in children]
