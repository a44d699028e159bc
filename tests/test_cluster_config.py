"""cluster.yaml against Ray's own cluster-config schema, and consistent with the project: the
weights staged per node, the IAM policies, the bucket."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from cellseg.config import load_config
from search.run import CLUSTER_PENDING_TRIALS
from search.space import load_space

REPO = Path(__file__).resolve().parents[1]
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"  # ships in the ray wheel
BUCKET = "cellseg-searches"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(config: dict) -> None:
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


def test_cluster_yaml_follows_rays_schema(cluster: dict) -> None:
    validate(cluster)
    with pytest.raises(jsonschema.ValidationError, match="worker_types"):
        validate({**cluster, "worker_types": {}})  # the check can fail
    broken = {
        **cluster,
        "available_node_types": {
            **cluster["available_node_types"],
            "gpu_worker": {"node_config": {}, "min_workers": "0"},
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_gpu_workers_autoscale_from_zero_and_the_head_runs_no_trial(cluster: dict) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    worker = cluster["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] == cluster["max_workers"]
    assert cluster["max_workers"] == CLUSTER_PENDING_TRIALS  # the driver asks for all at once
    assert cluster["upscaling_speed"] >= cluster["max_workers"]


def test_every_node_stages_the_weights_of_every_backbone_a_gpu_search_uses(cluster: dict) -> None:
    [setup] = [c for c in cluster["setup_commands"] if "setup_node.sh" in c]
    staged = set(setup.split()[3:])
    base = load_config(REPO / "trials" / "base.yaml")
    space = load_space(REPO / "trials" / "space_gpu.yaml", base)
    [backbones] = [p.values for p in space.params if p.key == "model.backbone"]
    presets = [load_config(REPO / "trials" / f"report_{x}.yaml") for x in "ab"]
    wanted = {base.model.backbone, *backbones, *(p.model.backbone for p in presets)}
    assert staged == wanted
    assert (REPO / "cluster" / "setup_node.sh").is_file()


def test_setup_updates_apt_and_installs_the_cluster_extra(cluster: dict) -> None:
    commands = "\n".join(cluster["setup_commands"])
    assert re.search(r"apt-get update.*&&.*apt-get install", commands)
    script = (REPO / "cluster" / "setup_node.sh").read_text()
    assert "[cluster]" in script
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'cluster = \["boto3==[0-9.]+"\]', pyproject)  # AWS autoscaler, MLflow s3://


def test_iam_profiles_and_policies_match(cluster: dict) -> None:
    types = cluster["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"] == {"Name": "cellseg-head"}
    assert types["gpu_worker"]["node_config"]["IamInstanceProfile"] == {"Name": "cellseg-worker"}
    head = json.loads((REPO / "cluster" / "head-policy.json").read_text())
    worker = json.loads((REPO / "cluster" / "worker-policy.json").read_text())
    actions = {
        a for s in head["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole", "s3:PutObject"} <= actions
    [pass_role] = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"].endswith(":role/cellseg-worker")
    for policy in (head, worker):
        assert f"arn:aws:s3:::{BUCKET}/*" in [s["Resource"] for s in policy["Statement"]]
    text = (REPO / "cluster.yaml").read_text()
    assert f"s3://{BUCKET}/mlflow" in text and f"s3://{BUCKET}/wheelhouse" in text
