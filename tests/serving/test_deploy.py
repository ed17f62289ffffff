"""deploy/: the `ray up` cluster file passes Ray's own validator and starts the pdserve config
that the repository ships, on nodes big enough for it.

`prepare_config` works offline for AWS: it only merges ray/autoscaler/aws/defaults.yaml (a
file in the Ray wheel) and fills per-node-type worker counts; nothing talks to AWS until
`ray up` bootstraps the provider.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.config import load_cluster_config
from cluster.placement import instance_bundles

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "deploy" / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(cluster_yaml) -> dict:
    """The config as `ray up` sees it: AWS defaults merged in, then validated."""
    config = prepare_config(copy.deepcopy(cluster_yaml))
    validate_config(config)
    return config


def _served_config_path(config: dict) -> str:
    """The --config path of the `pdserve serve` that the head starts."""
    for command in config["head_start_ray_commands"]:
        found = re.search(r"\bpdserve serve --config (\S+?)'?(\s|$)", command)
        if found:
            return found.group(1)
    raise AssertionError("no head start command runs `pdserve serve --config`")


def _local_path(config: dict, remote: str) -> Path:
    """Where a path on the nodes comes from on this machine, through file_mounts."""
    for remote_root, local_root in config["file_mounts"].items():
        if remote == remote_root or remote.startswith(remote_root.rstrip("/") + "/"):
            return (REPO_ROOT / local_root / remote[len(remote_root):].lstrip("/")).resolve()
    raise AssertionError(f"{remote} is not under any file_mounts entry")


def test_ray_validator_accepts_the_cluster_file(prepared):
    assert prepared["cluster_name"] == "pdserve"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validator_rejects_a_typo(cluster_yaml):
    """Guards the test above: the validator is strict about keys, so it is worth running."""
    broken = copy.deepcopy(cluster_yaml)
    broken["head_start_ray_comands"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_comands"):
        validate_config(prepare_config(broken))


def test_head_starts_ray_then_pdserve_in_the_background(prepared):
    commands = prepared["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    serve = next(i for i, c in enumerate(commands) if "pdserve serve --config" in c)
    assert ray_start < serve
    assert "--port=6379" in commands[ray_start]
    assert "nohup" in commands[serve] and commands[serve].rstrip().endswith("&")


def test_ray_keeps_token_authentication_on(prepared):
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c or "pdserve serve" in c):
        assert "RAY_AUTH_MODE=token" in command
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_nodes_install_the_local_ray_version_and_pdserve(prepared):
    setup = prepared["worker_setup_commands"]
    assert any(f'"ray[default]=={ray.__version__}"' in command for command in setup)
    assert any("pip install -e ~/pdserve" in command for command in setup)
    assert _local_path(prepared, "~/pdserve") == REPO_ROOT


def test_pdserve_config_started_on_the_head_is_in_the_repo_and_valid(prepared):
    local = _local_path(prepared, _served_config_path(prepared))
    assert local == REPO_ROOT / "deploy" / "pdserve.yaml"
    config = load_cluster_config(local)
    assert config.device == "cuda"


def test_gpu_workers_fit_every_instance_of_the_pdserve_config(prepared):
    config = load_cluster_config(REPO_ROOT / "deploy" / "pdserve.yaml")
    node_types = prepared["available_node_types"]
    workers = [t for name, t in node_types.items() if name != prepared["head_node_type"]]
    # One instance per worker node: each instance's bundles fit one node (STRICT_PACK).
    slots = [t["resources"] for t in workers for _ in range(t["min_workers"])]
    instances = [instance_bundles(pool) for pool in config.pools for _ in range(pool.num_instances)]
    assert len(slots) >= len(instances)
    for bundles, node in zip(instances, slots):
        for resource in ("CPU", "GPU"):
            assert sum(b.get(resource, 0) for b in bundles) <= node.get(resource, 0)
    head = node_types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "engines stay off the router's node"
