"""A search on Ray's fake autoscaling cluster, shaped like cluster.yaml: a head without trial
resources and GPU workers from zero. The driver asks for every trial's node at once, the GPU
nodes come up, every trial runs on one of them and MLflow gets every trial.

Ray's ``AutoscalingCluster`` runs ``ray stop --force`` (every Ray process on the machine) and its
config template is missing from the Ray 2.60 wheel, so this test starts the same fake-multinode
autoscaler itself, on free ports, and ends only the processes of its own temp folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml
from ray.util import placement_group_table

from searchutil import free_port, search_args, search_runs, start_driver, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
WORKERS = 2
AUTH_OFF = {"RAY_AUTH_MODE": "disabled"}  # the fake cluster's processes and the driver's


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's node types and scaling for Ray's fake multi-node provider (one machine):
    the same head resources and worker bounds, a fake GPU and one CPU per worker."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = real["available_node_types"][real["head_node_type"]]
    worker = real["available_node_types"]["gpu_worker"]
    assert head["resources"] == {"CPU": 0} and worker["min_workers"] == 0
    return {
        "cluster_name": "cellseg-fake",
        "max_workers": WORKERS,
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": real["idle_timeout_minutes"],
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
            "launch_multiple": True,
        },  # as EC2 does: one request for N instances
        "available_node_types": {
            "ray.head.default": {"resources": dict(head["resources"]), "node_config": {}, "max_workers": 0},
            "gpu_worker": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": worker["min_workers"],
                "max_workers": WORKERS,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _own_processes(temp_dir: str) -> list[int]:
    """The ids of the processes of the Ray instance rooted at ``temp_dir`` (their command lines
    name it)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # ended meanwhile
            pass
    return found


def _end(pids: list[int], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL for those still alive after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


@pytest.fixture
def autoscaling_cluster() -> Iterator[str]:
    """A fake autoscaling cluster's GCS address; its processes are ended afterwards. Ray's token
    authentication is off for it and for the driver (:data:`AUTH_OFF`): the token file in ~/.ray
    is shared with any other Ray cluster of the machine. Not for this process: Ray reads the mode
    into its configuration once per cluster it starts, so a changed mode here would outlive the
    test, and a later local cluster's client would not send the token its servers expect."""
    temp_dir = tempfile.mkdtemp(prefix="cs-as-", dir="/tmp")  # short: Unix socket paths
    address = f"127.0.0.1:{free_port()}"
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster_config(address)))
    env = {**os.environ, **AUTH_OFF, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={address.split(':')[1]}",
                "--num-cpus=0",
                "--num-gpus=0",
                f"--temp-dir={temp_dir}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                f"--autoscaling-config={config}",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield address
    finally:
        _end([pid for pid in _own_processes(temp_dir) if pid != os.getpid()])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_gpu_trials_start_their_nodes_together_and_never_run_on_the_head(
    tmp_path, easy_root, tiny_search, autoscaling_cluster
):
    address = autoscaling_cluster
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "shared"
    log = tmp_path / "driver.log"
    driver = start_driver(
        [
            "--address",
            address,
            "--gpus-per-trial",
            "1",
            "--num-samples",
            str(WORKERS),
            "--max-epochs",
            "1",
            *search_args(easy_root, tiny_search, storage, uri, "auto", "a1"),
        ],
        log,
        env={**os.environ, **AUTH_OFF},
    )
    ray.init(address=address)
    try:
        most_pending = 0

        def trials_placed() -> bool:
            nonlocal most_pending
            states = [pg["state"] for pg in placement_group_table().values()]
            most_pending = max(most_pending, states.count("PENDING"))
            assert driver.poll() is None, log.read_text()[-3000:]
            return states.count("CREATED") + states.count("REMOVED") >= WORKERS

        wait_for(trials_placed, 300, f"{WORKERS} trials placed on GPU nodes")
        assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
        head = next(
            n["NodeID"]
            for n in ray.nodes()
            if n["Resources"].get("CPU", 0) == 0 and "GPU" not in n["Resources"]
        )
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    finally:
        ray.shutdown()
        if driver.poll() is None:
            driver.kill()
    # the driver had every trial waiting at once, so the autoscaler launched their nodes together
    assert most_pending == WORKERS, f"at most {most_pending} trial(s) waited for a node at once"
    assert len(gpu_nodes) == WORKERS
    _, _, children = search_runs(uri, "auto", "a1")
    assert len(children) == WORKERS and all(c.info.status == "FINISHED" for c in children)
    used = {c.data.tags["ray.node_id"] for c in children}
    assert used == gpu_nodes and head not in used  # one trial per GPU node, none on the head
