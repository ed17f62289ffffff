"""Whether the pools fit the Ray cluster, checked before any placement group is created.

Two questions, both answered from Ray's resource tables in a few milliseconds:

    totals    every instance of both pools together: CPUs and GPUs <= the cluster's
    one node  each instance's bundles all on one node (STRICT_PACK): some node holds its CPUs
              and GPUs together

On a private Ray (ray_address "local", cluster/ray_runtime.py) the cluster is this one node and
cannot grow, so a pool that does not fit is a ClusterCapacityError at once, naming the numbers
and the keys to change. A joined cluster may still grow (`ray up` starts the workers after the
head, the autoscaler adds nodes on demand), so there the same text is a warning and the
placement timeout decides.
"""

from __future__ import annotations

import logging

import ray

from cluster.config import ClusterConfig, PoolConfig
from cluster.ray_runtime import LOCAL

log = logging.getLogger(__name__)

RESOURCE_KEYS = (("CPU", "cpus_per_instance"), ("GPU", "gpus_per_instance"))
_EPSILON = 1e-6  # Ray keeps resources to 4 decimal places


class ClusterCapacityError(ValueError):
    """The pools need more CPUs or GPUs than the Ray cluster has; the message says how many."""


def check_capacity(config: ClusterConfig) -> None:
    """Raise ClusterCapacityError (private Ray) or log a warning (joined cluster) when the pools
    cannot fit the cluster's nodes."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    problems = capacity_problems(config, ray.cluster_resources(), nodes)
    if not problems:
        return
    message = (f"{'; '.join(problems)}. Cluster total: {resource_summary(ray.cluster_resources())}"
               f", available now: {resource_summary(ray.available_resources())}; `ray status` "
               "shows each node")
    if config.ray_address == LOCAL:
        raise ClusterCapacityError(
            f"cannot start the pools on this private Ray: {message}. A private Ray has this "
            "machine's resources only; to use more machines, join their Ray cluster "
            "(--ray-address)")
    log.warning("%s. Waiting up to placement_timeout_s (%g s) for nodes to join.",
                message, config.placement_timeout_s)


def capacity_problems(config: ClusterConfig, total: dict[str, float],
                      nodes: list[dict[str, float]]) -> list[str]:
    """What does not fit, one sentence each; empty when the pools fit."""
    problems = [_total_problem(config.pools, resource, key, total.get(resource, 0.0))
                for resource, key in RESOURCE_KEYS]
    problems += [_node_problem(pool, nodes) for pool in config.pools if pool.num_instances]
    return [problem for problem in problems if problem]


def _total_problem(pools: tuple[PoolConfig, ...], resource: str, key: str,
                   have: float) -> str | None:
    asking = [pool for pool in pools if pool.num_instances and getattr(pool, key)]
    need = sum(pool.num_instances * getattr(pool, key) for pool in asking)
    if need <= have + _EPSILON:
        return None
    parts = ", ".join(f"{pool.role} {pool.num_instances} × {float(getattr(pool, key))}"
                      for pool in asking)
    keys = ", ".join([*(f"{pool.role}.{key}" for pool in asking),
                      *(f"{pool.role}.num_instances" for pool in asking)])
    return (f"the pools need {need:g} {resource}s ({parts}) but the Ray cluster has {have:g}; "
            f"lower {keys}, or add nodes")


def _node_problem(pool: PoolConfig, nodes: list[dict[str, float]]) -> str | None:
    need = instance_resources(pool)
    if any(_holds(node, need) for node in nodes):
        return None
    largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)),
                  default={})
    return (f"one {pool.role} instance needs {resource_summary(need)} on one node but no node "
            f"has that much (the largest: {resource_summary(largest)}); lower "
            f"{pool.role}.cpus_per_instance or {pool.role}.gpus_per_instance, or add a larger "
            "node")


def instance_resources(pool: PoolConfig) -> dict[str, float]:
    """What one instance of `pool` reserves in all, its ranks' bundles together."""
    return {resource: float(getattr(pool, key)) for resource, key in RESOURCE_KEYS
            if getattr(pool, key)}


def _holds(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(node.get(resource, 0.0) + _EPSILON >= amount for resource, amount in need.items())


def resource_summary(resources: dict[str, float]) -> str:
    """CPU and GPU first; Ray's per-node `node:<ip>` markers and byte counts left out."""
    shown = {key: value for key, value in resources.items()
             if not key.startswith("node:") and key not in ("memory", "object_store_memory")}
    ordered = sorted(shown, key=lambda key: (key not in ("CPU", "GPU"), key))
    return "{" + ", ".join(f"{key}: {shown[key]:g}" for key in ordered) + "}"
