"""A search on a simulated two-node Ray cluster: trials on both nodes, checkpoints in shared
storage, and a trial whose node is removed resumes on the other node from its checkpoint."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from search.run import main as search_main
from searchutil import epochs_of, search_args, search_runs, start_driver, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes():
    """A head and a worker node of one CPU each, with this process connected as a driver."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trials_run_on_both_nodes_and_checkpoint_to_shared_storage(
    tmp_path, easy_root, tiny_search, two_nodes
):
    cluster, _ = two_nodes
    storage = tmp_path / "shared"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    code = search_main(
        [
            "--address",
            cluster.address,
            "--num-samples",
            "2",
            "--max-epochs",
            "1",
            "--cpus-per-trial",
            "1",
            *search_args(easy_root, tiny_search, storage, uri, "cluster", "c1"),
        ]
    )
    assert code == 0 and len(nodes) == 2
    _, _, children = search_runs(uri, "cluster", "c1")
    assert len(children) == 2
    assert {c.data.tags["ray.node_id"] for c in children} == nodes
    assert len(list(storage.glob("c1/trial_*/checkpoint_*"))) == 2  # in the shared storage
    assert not list(storage.glob("c1/trial_*/checkpoint_*/*.pt")), "best.pt lies in MLflow, once"


@ray.remote(num_cpus=1)
class CpuHolder:
    """Keeps the head node's CPU busy so that the trial starts on the worker node."""

    def ready(self) -> bool:
        return True


def test_trial_of_a_removed_node_resumes_on_the_other_from_its_checkpoint(
    tmp_path, easy_root, tiny_search, two_nodes
):
    cluster, worker = two_nodes
    head_id = cluster.head_node.node_id
    holder = CpuHolder.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)
    ).remote()
    ray.get(holder.ready.remote())
    storage = tmp_path / "shared"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "driver.log"

    def first_epoch_logged_from_worker() -> bool:
        client, _, children = search_runs(uri, "cluster", "n1")
        return any(
            epochs_of(client, child) and child.data.tags.get("ray.node_id") == worker.node_id
            for child in children
        )

    driver = start_driver(
        [
            "--address",
            cluster.address,
            "--num-samples",
            "1",
            "--max-epochs",
            "3",
            "--cpus-per-trial",
            "1",
            "--max-failures",
            "1",
            *search_args(easy_root, tiny_search, storage, uri, "cluster", "n1"),
        ],
        log,
    )
    try:
        wait_for(
            lambda: any(storage.glob("n1/trial_*/checkpoint_000000/best.pt")),
            600,
            "the trial's first checkpoint",
        )
        wait_for(
            first_epoch_logged_from_worker,
            120,
            "the driver to take the first result from the worker node (MLflow has it)",
        )
        ray.kill(holder)
        cluster.remove_node(worker)
        assert driver.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    client, _, [child] = search_runs(uri, "cluster", "n1")
    assert child.info.status == "FINISHED" and child.data.tags["ray.num_failures"] == "1"
    # MLflow is the record: with remote storage Tune's own result.json is copied back from storage
    # when a trial is retried, so it loses the rows reported after its last upload
    epochs = epochs_of(client, child)  # repeats kept: a trial that started over logs 1 twice
    assert epochs == [1, 2, 3], "the trial started over instead of resuming"
    assert child.data.tags["ray.node_id"] == head_id
