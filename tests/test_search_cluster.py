"""A search on a simulated two-node Ray cluster places trials on both nodes, shared storage."""
from __future__ import annotations

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from search.run import SEARCH_TAG, main as search_main

pytestmark = pytest.mark.slow


def test_trials_run_on_both_nodes_and_checkpoint_to_shared_storage(tmp_path, easy_root, tiny_search):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    storage = tmp_path / "shared"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        ray.init(address=cluster.address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        code = search_main([
            "--address", cluster.address, "--data", str(easy_root),
            "--base", str(tiny_search["base"]), "--space", str(tiny_search["space"]),
            "--num-samples", "2", "--max-epochs", "1", "--cpus-per-trial", "1",
            "--storage", str(storage), "--tracking-uri", uri, "--experiment", "cluster",
            "--name", "c1"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert code == 0 and len(nodes) == 2
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    parent = next(r for r in runs if r.data.tags.get(SEARCH_TAG) == "c1")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert {c.data.tags["ray.node_id"] for c in children} == nodes
    assert len(list(storage.glob("c1/trial_*/checkpoint_*/best.pt"))) == 2
