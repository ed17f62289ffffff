"""cluster/placement.py on a real, local, two-node Ray cluster (tests/serving/ray_nodes.py).

Each node has 2 CPUs and 2 GPUs; the GPUs are only declared, so Ray schedules on them without
hardware. Every test that uses the cluster must leave all of it free again (`node_ids` checks).
"""

from __future__ import annotations

import time

import pytest
import ray
from ray.util import placement_group_table

from cluster.capacity import ClusterCapacityError, capacity_problems
from cluster.config import ClusterConfig, PoolConfig
from cluster.placement import (
    InstancePlacement,
    PlacementTimeoutError,
    create_cluster_placements,
    create_instance_placement,
    instance_bundles,
    remove_placement,
)
from cluster.pools import _actor_options, worker_specs
from tests.serving.ray_nodes import local_cluster

NODE_RESOURCES = {"num_cpus": 2, "num_gpus": 2}
NUM_NODES = 2
TOTAL = {"CPU": 2.0 * NUM_NODES, "GPU": 2.0 * NUM_NODES}


@pytest.fixture(scope="module")
def _ray_cluster():
    """Two nodes (the head and one worker) with 2 CPUs and 2 declared GPUs each."""
    with local_cluster(NUM_NODES, **NODE_RESOURCES) as address:
        ray.init(address=address)
        try:
            assert _wait_until(lambda: len(_alive_nodes()) == NUM_NODES, timeout_s=60.0)
            yield _alive_nodes()
        finally:
            ray.shutdown()


def _alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@pytest.fixture
def node_ids(_ray_cluster):
    """The cluster's node ids; after the test, every placement must be gone again."""
    yield _ray_cluster
    assert _wait_until(lambda: _free() == TOTAL), f"resources not freed: {_free()}"
    leaked = [pg["name"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert leaked == []


def _free() -> dict[str, float]:
    available = ray.available_resources()
    return {key: available.get(key, 0.0) for key in TOTAL}


def _wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _node_of(placement: InstancePlacement) -> str:
    nodes = set(placement_group_table(placement.placement_group)["bundles_to_node_id"].values())
    assert len(nodes) == 1, "STRICT_PACK puts every bundle on one node"
    return nodes.pop()


@ray.remote
class _Rank:
    def where(self) -> tuple[str, list]:
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()


def gpu_pool(role: str, **kwargs) -> PoolConfig:
    return PoolConfig(role, gpus_per_instance=1, cpus_per_instance=1, **kwargs)


# ---------------------------------------------------------------- bundles (no Ray needed)


def test_cpu_instance_asks_for_one_cpu_bundle():
    assert instance_bundles(PoolConfig("prefill", cpus_per_instance=2)) == [{"CPU": 2.0}]
    two_ranks = PoolConfig("prefill", cpus_per_instance=1, tensor_parallel_size=2)
    assert instance_bundles(two_ranks) == [{"CPU": 0.5}, {"CPU": 0.5}]  # one per Gloo rank


def test_gpu_instance_asks_for_one_gpu_bundle_per_rank():
    assert instance_bundles(gpu_pool("decode")) == [{"GPU": 1.0, "CPU": 1.0}]
    no_cpus = PoolConfig("decode", gpus_per_instance=1, cpus_per_instance=0)
    assert instance_bundles(no_cpus) == [{"GPU": 1.0}]


def cpu_config(prefill_cpus: float, decode_cpus: float, num_decode: int = 1) -> ClusterConfig:
    return ClusterConfig(prefill=PoolConfig("prefill", cpus_per_instance=prefill_cpus),
                         decode=PoolConfig("decode", num_instances=num_decode,
                                           cpus_per_instance=decode_cpus))


def test_capacity_counts_every_instance_and_each_instance_on_one_node():
    nodes = [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0}]
    total = {"CPU": 4.0, "GPU": 4.0}
    assert capacity_problems(cpu_config(0.5, 0.5, num_decode=7), total, nodes) == []
    (too_many,) = capacity_problems(cpu_config(1, 1, num_decode=4), total, nodes)
    assert too_many == ("the pools need 5 CPUs (prefill 1 × 1.0, decode 4 × 1.0) but the Ray "
                        "cluster has 4; lower prefill.cpus_per_instance, "
                        "decode.cpus_per_instance, prefill.num_instances, "
                        "decode.num_instances, or add nodes")
    wide = ClusterConfig(prefill=gpu_pool("prefill"),
                         decode=PoolConfig("decode", gpus_per_instance=1, cpus_per_instance=3))
    (too_wide,) = capacity_problems(wide, total, nodes)
    assert too_wide.startswith("one decode instance needs {CPU: 3, GPU: 1} on one node but no "
                               "node has that much (the largest: {CPU: 2, GPU: 2})")
    no_gpus = capacity_problems(wide, {"CPU": 4.0}, [{"CPU": 4.0}])[0]
    assert no_gpus.startswith("the pools need 2 GPUs (prefill 1 × 1.0, decode 1 × 1.0) but the "
                              "Ray cluster has 0")


# ---------------------------------------------------------------- on the cluster


def test_each_instance_gets_its_own_group_on_its_own_node(node_ids):
    config = ClusterConfig(prefill=gpu_pool("prefill"), decode=gpu_pool("decode"))
    placements = create_cluster_placements(config)
    try:
        assert [(p.role, p.instance_index, p.name) for p in placements] == [
            ("prefill", 0, "pdserve-prefill-0"), ("decode", 0, "pdserve-decode-0")]
        for placement in placements:
            table = placement_group_table(placement.placement_group)
            assert (table["name"], table["strategy"], table["state"]) == (
                placement.name, "STRICT_PACK", "CREATED")
            assert table["bundles"] == {0: {"GPU": 1.0, "CPU": 1.0}}
        nodes = [_node_of(p) for p in placements]
        # Either node could hold both instances; Ray's scheduler spreads them.
        assert len(set(nodes)) == 2 and set(nodes) <= node_ids
    finally:
        for placement in placements:
            remove_placement(placement)


def test_rank_actor_runs_inside_its_bundle(node_ids):
    placement = create_instance_placement(gpu_pool("decode"), 0, timeout_s=10)
    try:
        rank = _Rank.options(
            num_cpus=1, num_gpus=1, scheduling_strategy=placement.scheduling_strategy(0)
        ).remote()
        node_id, gpu_ids = ray.get(rank.where.remote(), timeout=30)
        assert node_id == _node_of(placement)
        assert len(gpu_ids) == 1
        ray.kill(rank)
        with pytest.raises(ValueError, match="rank must be in 0..0"):
            placement.scheduling_strategy(1)
    finally:
        remove_placement(placement)


def test_cpu_instance_is_placed(node_ids):
    placement = create_instance_placement(PoolConfig("prefill", cpus_per_instance=2), 1, 10)
    try:
        assert placement.bundles == ({"CPU": 2.0},)
        assert placement_group_table(placement.placement_group)["state"] == "CREATED"
    finally:
        remove_placement(placement)


def test_unsatisfiable_instance_times_out_with_an_actionable_message(node_ids):
    # The cluster has 4 CPUs and 4 GPUs in total, but no node has 3 CPUs next to a GPU.
    pool = PoolConfig("decode", gpus_per_instance=1, cpus_per_instance=3)
    started = time.monotonic()
    with pytest.raises(PlacementTimeoutError) as caught:
        create_instance_placement(pool, 0, timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 5.0
    message = str(caught.value)
    assert "decode instance 0 (pdserve-decode-0)" in message
    assert "[{'GPU': 1.0, 'CPU': 3.0}]" in message
    assert "STRICT_PACK" in message
    assert "Cluster total: {CPU: 4, GPU: 4" in message
    assert "`ray status`" in message
    assert isinstance(caught.value, RuntimeError)


def test_failed_cluster_placement_removes_what_it_created(node_ids):
    # The totals fit (4 CPUs, 3 GPUs) and so does each instance, but once the two prefill
    # instances took 1.5 CPUs on each node, the decode instance's 1 CPU fits on neither.
    config = ClusterConfig(
        prefill=PoolConfig("prefill", num_instances=2, gpus_per_instance=1, cpus_per_instance=1.5),
        decode=gpu_pool("decode"),
        placement_timeout_s=0.5,
    )
    with pytest.raises(PlacementTimeoutError, match="decode instance 0"):
        create_cluster_placements(config)
    # The prefill group that was granted is gone too (checked by `node_ids`).
    names = {pg["name"] for pg in placement_group_table().values()}
    assert {"pdserve-prefill-0", "pdserve-decode-0"} <= names


def test_zero_decode_instances_reserve_nothing_for_decode(node_ids):
    config = ClusterConfig(decode=PoolConfig("decode", num_instances=0))
    placements = create_cluster_placements(config)
    try:
        assert [p.role for p in placements] == ["prefill"]
    finally:
        for placement in placements:
            remove_placement(placement)


def test_pools_that_do_not_fit_fail_at_once_with_the_numbers(node_ids):
    started = time.monotonic()
    with pytest.raises(ClusterCapacityError) as caught:
        create_cluster_placements(cpu_config(1, 1, num_decode=4))
    assert time.monotonic() - started < 2.0  # not after placement_timeout_s (60 s)
    message = str(caught.value)
    assert "the pools need 5 CPUs (prefill 1 × 1.0, decode 4 × 1.0) but the Ray cluster has 4" \
        in message
    assert "decode.num_instances" in message and "Cluster total: {CPU: 4, GPU: 4" in message
    assert isinstance(caught.value, ValueError)  # nothing was reserved (`node_ids` checks)


def test_half_cpu_instances_place_and_their_actors_start(node_ids):
    config = cpu_config(0.5, 0.5)
    placements = create_cluster_placements(config)
    actors = []
    try:
        assert [p.bundles for p in placements] == [({"CPU": 0.5},), ({"CPU": 0.5},)]
        prefill, decode = worker_specs(config, "127.0.0.1")
        assert prefill[0].num_threads == decode[0].num_threads == 1
        for spec, placement in zip(prefill + decode, placements):
            options = _actor_options(spec, placement)
            assert (options["num_cpus"], options["num_gpus"]) == (0.5, 0.0)
            assert options["name"] == f"pdserve-{spec.instance_id}"
            actors.append(_Rank.options(**options).remote())
        nodes = ray.get([actor.where.remote() for actor in actors], timeout=60)
        assert [node for node, _ in nodes] == [_node_of(p) for p in placements]
    finally:
        for actor in actors:
            ray.kill(actor)
        for placement in placements:
            remove_placement(placement)
