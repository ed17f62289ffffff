"""Reserving cluster resources for engine instances with Ray placement groups.

One placement group per instance, strategy STRICT_PACK: all of an instance's ranks land on one
node, because they share NCCL all-reduces every layer. Bundles:

    GPU instance:  one {"GPU": 1, "CPU": cpus_per_instance / num_ranks} bundle per rank
    CPU instance:  one {"CPU": cpus_per_instance / num_ranks} bundle per rank (Gloo ranks)

Rank i's actor is scheduled on bundle i via `InstancePlacement.scheduling_strategy(i)`.

Spreading instances over nodes: each instance's group is created on its own, in order, and
Ray's GCS scheduler places every new group on the node with the most resources left (its
least-resource scorer), so consecutive instances land on different nodes while nodes have
room, and share a node only when they must. We rely on that instead of the private
`_soft_target_node_id` hint; tests/serving/test_placement.py checks the spread on a two-node
cluster so a Ray upgrade that changes it is noticed.

Groups fate-share with the driver that created them (no detached lifetime): if `pdserve serve`
dies, Ray frees its GPUs.

Before the first group is created, `create_cluster_placements` checks two things and fails at
once rather than after `placement_timeout_s`: no other deployment of the same name runs on the
cluster (its groups `{name}-{role}-{i}` or its actors in the namespace `name`), and the pools fit
the cluster (cluster/capacity.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ray
from ray.util import placement_group, placement_group_table, remove_placement_group
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.capacity import check_capacity, resource_summary
from cluster.config import ROLES, ClusterConfig, PoolConfig

STRATEGY = "STRICT_PACK"


class PlacementTimeoutError(RuntimeError):
    """An instance's placement group was not ready in time: the cluster lacks the resources."""


class DeploymentNameInUseError(ValueError):
    """Another deployment of the same name runs on this Ray cluster."""


@dataclass(frozen=True, slots=True)
class InstancePlacement:
    """The resources reserved for one engine instance: a ready placement group, one bundle per
    rank."""

    role: str  # "prefill" or "decode"
    instance_index: int  # position in its pool, 0-based
    placement_group: PlacementGroup
    bundles: tuple[dict[str, float], ...]  # bundle i is rank i's reservation
    deployment: str = "pdserve"  # the config's name: prefix of the group's name
    incarnation: int = 0  # 0 at start; +1 each time the instance is replaced after a death

    @property
    def name(self) -> str:
        return instance_name(self.deployment, self.role, self.instance_index, self.incarnation)

    @property
    def num_ranks(self) -> int:
        return len(self.bundles)

    def scheduling_strategy(self, rank: int = 0) -> PlacementGroupSchedulingStrategy:
        """Where to put rank `rank`'s actor: `Actor.options(scheduling_strategy=...)`.

        Child tasks the actor starts stay inside the instance's reservation.
        """
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in 0..{self.num_ranks - 1} for {self.name}, got {rank}")
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=rank,
            placement_group_capture_child_tasks=True,
        )


def instance_name(deployment: str, role: str, instance_index: int, incarnation: int = 0) -> str:
    """The placement group's (and rank 0 actor's) name, e.g. "pdserve-decode-0" (visible in
    `ray status`); a replacement adds its incarnation: "pdserve-decode-0-r2"."""
    base = f"{deployment}-{role}-{instance_index}"
    return f"{base}-r{incarnation}" if incarnation else base


def actor_name(deployment: str, instance_id: str) -> str:
    """A worker actor's name, e.g. "pdserve-decode-0" (`ray list actors`)."""
    return f"{deployment}-{instance_id}"


def instance_bundles(pool: PoolConfig) -> list[dict[str, float]]:
    """The bundles one instance of `pool` asks for (see the module docstring)."""
    if pool.gpus_per_instance == 0:
        ranks = pool.tensor_parallel_size * pool.pipeline_parallel_size
        return [{"CPU": pool.cpus_per_instance / ranks} for _ in range(ranks)]
    cpus_per_rank = pool.cpus_per_instance / pool.gpus_per_instance
    bundle = {"GPU": 1.0, "CPU": float(cpus_per_rank)} if cpus_per_rank else {"GPU": 1.0}
    return [dict(bundle) for _ in range(pool.gpus_per_instance)]


def create_instance_placement(
    pool: PoolConfig, instance_index: int, timeout_s: float, deployment: str = "pdserve",
    incarnation: int = 0,
) -> InstancePlacement:
    """Reserve one instance's resources and wait until Ray grants them.

    Raises PlacementTimeoutError (after removing the pending group) if that takes longer than
    `timeout_s`.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    bundles = instance_bundles(pool)
    name = instance_name(deployment, pool.role, instance_index, incarnation)
    group = placement_group(bundles, strategy=STRATEGY, name=name)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementTimeoutError(
            _timeout_message(pool.role, instance_index, name, bundles, timeout_s))
    return InstancePlacement(pool.role, instance_index, group, tuple(bundles), deployment,
                             incarnation)


def create_cluster_placements(config: ClusterConfig) -> list[InstancePlacement]:
    """Reserve every instance of both pools, prefill first; all or nothing.

    First, at once: DeploymentNameInUseError if a deployment of this name runs on the
    cluster, ClusterCapacityError if the pools cannot fit it (only a warning when the cluster
    may grow, see cluster/capacity.py). If one instance times out, the groups already created
    are removed before the error is raised, so a failed start leaves the cluster as it was.
    """
    check_name_free(config.name)
    check_capacity(config)
    placements: list[InstancePlacement] = []
    try:
        for pool in config.pools:
            for index in range(pool.num_instances):
                placements.append(create_instance_placement(
                    pool, index, config.placement_timeout_s, config.name))
    except BaseException:
        for placement in placements:
            remove_placement(placement)
        raise
    return placements


def remove_placement(placement: InstancePlacement) -> None:
    """Release an instance's reservation. Kill its actors first: Ray kills any still in it."""
    remove_placement_group(placement.placement_group)


def check_name_free(deployment: str) -> None:
    """Raise DeploymentNameInUseError if a deployment named `deployment` holds placement groups
    or named actors on this Ray cluster (Ray would otherwise refuse its actor names only after
    its groups waited for resources the other deployment holds)."""
    pattern = re.compile(rf"{re.escape(deployment)}-({'|'.join(ROLES)})-\d+(-r\d+)?")
    groups = sorted(pg["name"] for pg in placement_group_table().values()
                    if pg["state"] != "REMOVED" and pattern.fullmatch(pg["name"]))
    actors = sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                    if actor["namespace"] == deployment)
    if groups or actors:
        held = ", ".join([*(f"placement group {g}" for g in groups),
                          *(f"actor {a}" for a in actors)])
        raise DeploymentNameInUseError(
            f"a pdserve deployment named {deployment!r} already runs on this Ray cluster "
            f"({held}); give this one a different name (`name:` in the cluster config or "
            f"--name), or stop the other one first"
        )


def _timeout_message(role: str, instance_index: int, group_name: str,
                     bundles: list[dict[str, float]], timeout_s: float) -> str:
    return (
        f"{role} instance {instance_index} ({group_name}) could not "
        f"be placed within {timeout_s:g} s: it asks for {len(bundles)} bundle(s) {bundles} "
        f"with strategy {STRATEGY} (all on one node). Cluster total: "
        f"{resource_summary(ray.cluster_resources())}; available now: "
        f"{resource_summary(ray.available_resources())}. Run `ray status` to see each node "
        f"and the pending demands; add nodes, or lower {role}.gpus_per_instance, "
        f"{role}.cpus_per_instance or {role}.num_instances."
    )
