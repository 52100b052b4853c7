"""The cluster-launcher config validates against Ray's own schema."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(config)  # raises on any schema violation
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["max_workers"] <= config["max_workers"] for t in gpu_types)
    assert not config["available_node_types"][config["head_node_type"]]["resources"].get("GPU")


def test_schema_check_catches_a_broken_config():
    import pytest

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["head.cpu"]["no_such_field"] = 1
    with pytest.raises(Exception, match="no_such_field"):
        validate_config(config)


def test_dashboard_listens_on_the_head_only():
    """The Jobs API runs any command it is sent: reachable through an SSH tunnel, not the network."""
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert "ray dashboard ray_cluster.yaml" in text and "<head>:8265" not in text
