"""deploy/cluster.yaml against Ray's own cluster-config schema, offline."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "deploy" / "cluster.yaml"


def _load():
    return yaml.safe_load(CLUSTER.read_text())


@pytest.mark.unit
def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load()))
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 1
    workers = [
        t for n, t in config["available_node_types"].items() if n != config["head_node_type"]
    ]
    assert workers and all(t["max_workers"] > t.get("min_workers", 0) for t in workers)


@pytest.mark.unit
def test_schema_check_rejects_a_broken_config():
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _load()
    bad["available_node_types"]["loupe.worker.cpu"]["min_workers"] = "many"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.unit
def test_cluster_installs_loupe_and_keeps_dashboard_on_loopback():
    config = _load()
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install" in setup and "/home/ubuntu/loupe" in setup
    assert "find_redis_server" in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
