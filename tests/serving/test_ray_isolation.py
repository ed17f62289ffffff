"""Deployments on one host do not collide (issue 11, defect 10), and a private Ray listens on
loopback only (docs/SECURITY.md).

One running one-node cluster (tests/serving/ray_nodes.py, which also writes
/tmp/ray/ray_current_cluster as `ray start` does) serves every test here: two deployments place
their pools on it side by side, a third with a taken name is refused at once, and a process
that starts Ray the way `pdserve serve` does gets a Ray of its own, not this one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cluster.config import ClusterConfig, PoolConfig
from cluster.placement import (
    DeploymentNameInUseError,
    create_cluster_placements,
    remove_placement,
)
from tests.serving.ray_nodes import local_cluster

REPO_ROOT = Path(__file__).resolve().parents[2]

# Started the way `pdserve serve` starts Ray, in a fresh interpreter without RAY_ADDRESS:
# report the Ray it got and every TCP listener of the processes it started.
PRIVATE_RAY_PROBE = """
import json, os, psutil, ray
from cluster.ray_runtime import init_ray

runtime = init_ray("local", "probe")

@ray.remote(num_cpus=0)
class Idle:
    def ready(self):
        return True

idle = Idle.remote()
ray.get(idle.ready.remote(), timeout=60)
me = psutil.Process()
listeners = sorted({(proc.name(), conn.laddr.ip, conn.laddr.port)
                    for proc in [me, *me.children(recursive=True)]
                    for conn in proc.net_connections(kind="inet")
                    if conn.status == psutil.CONN_LISTEN})
print(json.dumps({"private": runtime.private, "gcs_address": runtime.gcs_address,
                  "namespace": runtime.namespace, "listeners": listeners}))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def cluster_address():
    with local_cluster(1, num_cpus=2) as address:
        ray.init(address=address)
        try:
            yield address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def private_ray(cluster_address) -> dict:
    """What a `pdserve serve`-style Ray start reported while `cluster_address` was running."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", PRIVATE_RAY_PROBE], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def half_cpu_deployment(name: str) -> ClusterConfig:
    return ClusterConfig(name=name, prefill=PoolConfig("prefill", cpus_per_instance=0.5),
                         decode=PoolConfig("decode", cpus_per_instance=0.5))


def test_two_named_deployments_share_a_cluster_and_a_taken_name_is_refused(cluster_address):
    alpha = create_cluster_placements(half_cpu_deployment("alpha"))
    beta = create_cluster_placements(half_cpu_deployment("beta"))  # the cluster's other core
    try:
        assert [p.name for p in alpha + beta] == [
            "alpha-prefill-0", "alpha-decode-0", "beta-prefill-0", "beta-decode-0"]
        started = time.monotonic()
        with pytest.raises(DeploymentNameInUseError) as caught:
            create_cluster_placements(half_cpu_deployment("alpha"))
        assert time.monotonic() - started < 2.0  # not after the placement timeout
        assert "a pdserve deployment named 'alpha' already runs" in str(caught.value)
        assert "placement group alpha-prefill-0" in str(caught.value)
        assert "different name" in str(caught.value)
    finally:
        for placement in alpha + beta:
            remove_placement(placement)


def test_a_deployment_whose_actors_run_holds_its_name(cluster_address):
    @ray.remote(num_cpus=0)
    class Worker:
        def ready(self) -> bool:
            return True

    worker = Worker.options(name="alpha-prefill-0", namespace="alpha").remote()
    ray.get(worker.ready.remote(), timeout=60)
    with pytest.raises(DeploymentNameInUseError, match="actor alpha-prefill-0"):
        create_cluster_placements(half_cpu_deployment("alpha"))
    ray.kill(worker)
    deadline = time.monotonic() + 30
    while any(a["namespace"] == "alpha" for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, "the killed actor kept its name"
        time.sleep(0.1)
    for placement in create_cluster_placements(half_cpu_deployment("alpha")):
        remove_placement(placement)


def test_pdserve_without_an_address_starts_its_own_ray(cluster_address, private_ray):
    assert private_ray["private"] is True
    assert private_ray["gcs_address"] != cluster_address
    assert private_ray["gcs_address"].startswith("127.0.0.1:")
    assert private_ray["namespace"] == "probe"


def test_a_private_ray_listens_on_loopback_only(private_ray):
    listeners = private_ray["listeners"]
    names = {name for name, _, _ in listeners}
    # the GCS, the raylet and the workers' gRPC servers at least
    assert {"gcs_server", "raylet"} <= names, listeners
    exposed = [(name, host, port) for name, host, port in listeners if not _is_loopback(host)]
    assert exposed == []


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1" on a dual-stack socket
    return (mapped or address).is_loopback
