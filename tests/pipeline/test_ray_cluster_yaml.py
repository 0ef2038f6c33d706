"""ray_cluster.yaml is a cluster-launcher config Ray accepts, and it installs seqedit."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def _config() -> dict:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_ray_accepts_the_cluster_config() -> None:
    validate_config(_config())  # Ray's own JSON schema for `ray up`


def test_a_head_and_an_autoscaling_gpu_worker_group() -> None:
    config = _config()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    (gpu,) = workers
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family


def test_every_node_installs_this_checkout_of_seqedit() -> None:
    config = _config()
    assert config["file_mounts"]["~/seqedit"] == "."
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-e ~/seqedit" in setup
    assert "torch==2.13.0" in setup  # the torch the project pins
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_the_schema_check_has_teeth() -> None:
    broken = _config()
    del broken["provider"]["type"]
    with pytest.raises(jsonschema.ValidationError, match="type"):
        validate_config(broken)
