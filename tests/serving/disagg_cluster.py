"""Fixture pieces for tests that run the real disaggregated cluster on a local Ray."""

from __future__ import annotations

import atexit
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import ray

from cluster.config import cluster_config_from_dict
from engine.sampling_params import SamplingParams
from tests.helpers import assert_equal_or_near_tie, next_logits  # noqa: F401 (re-exported)
from tests.serving.harness import ServerHarness
from tests.serving.ray_nodes import local_cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_INFLIGHT = 24


@contextmanager
def local_ray(num_cpus: int = 8):
    """A one-node local Ray (started by a clean spawned process: tests/serving/ray_nodes.py),
    with this process connected to it as the driver until the block ends.

    The node is shared by the test modules of the session (starting one takes 5-15 s on a
    2-core machine): each block is a Ray job of its own, and when it ends, Ray removes the job's
    actors and placement groups. The next block starts only once the node is whole again (every
    CPU free, no placement group left); a node that does not get there in time is replaced by a
    fresh one. PDSERVE_TEST_FRESH_RAY=1 starts a node per block instead."""
    address = _shared_node(num_cpus)
    _connect(address)
    try:
        if not _node_is_whole(num_cpus, NODE_RECOVERY_TIMEOUT_S):
            ray.shutdown()
            stop_shared_ray()
            _connect(_shared_node(num_cpus))
            assert _node_is_whole(num_cpus, NODE_RECOVERY_TIMEOUT_S), ray.available_resources()
        yield
    finally:
        ray.shutdown()
        if os.environ.get("PDSERVE_TEST_FRESH_RAY") == "1":
            stop_shared_ray()


NODE_RECOVERY_TIMEOUT_S = 60.0  # the last job's workers exit and its groups go
_shared: dict[int, tuple[ExitStack, str]] = {}  # num_cpus -> (its owner, its address)


def _shared_node(num_cpus: int) -> str:
    if num_cpus not in _shared:
        stop_shared_ray()  # one node at a time
        owner = ExitStack()
        address = owner.enter_context(local_cluster(1, num_cpus=num_cpus))
        _shared[num_cpus] = (owner, address)
    return _shared[num_cpus][1]


def stop_shared_ray() -> None:
    """Stop the shared node (tests/serving/conftest.py at the session's end; also at exit)."""
    while _shared:
        _, (owner, _) = _shared.popitem()
        owner.close()


atexit.register(stop_shared_ray)  # before multiprocessing's exit handler kills the owner


def _connect(address: str) -> None:
    ray.init(address=address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                       "TOKENIZERS_PARALLELISM": "false"}})


def _node_is_whole(num_cpus: int, timeout_s: float) -> bool:
    """Every CPU of the node free and no placement group's resources left, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        if (total.get("CPU") == free.get("CPU") == num_cpus
                and not any("_group_" in key for key in total)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def cluster_config(num_prefill: int, num_decode: int, num_blocks: int = 256,
                   transfer_timeout_s: float = 10.0, prometheus_sd_file: str = "",
                   async_decode: bool | None = None, min_message_bytes: int | None = None):
    """A CPU cluster on 127.0.0.1 with free ports everywhere (gRPC, every /metrics).
    `async_decode` sets the decode pool's asynchronous scheduling (None: the CPU default, off);
    `min_message_bytes` the transfer's (None: the default, one message for these small KVs)."""
    transfer = {"timeout_s": transfer_timeout_s}
    if min_message_bytes is not None:
        transfer["min_message_bytes"] = min_message_bytes
    pool = {"cpus_per_instance": 1, "num_kv_blocks": num_blocks, "max_num_batched_tokens": 2048}
    return cluster_config_from_dict({
        "model": "default", "device": "cpu", "dtype": "float32", "block_size": 16,
        "prefill": {**pool, "num_instances": num_prefill},
        "decode": {**pool, "num_instances": num_decode, "async_scheduling": async_decode},
        "server": {"max_queued_requests": MAX_INFLIGHT, "grpc_host": "127.0.0.1", "grpc_port": 0,
                   "metrics_port": 0, "worker_metrics_port_base": 0,
                   "prometheus_sd_file": prometheus_sd_file},
        "transfer": transfer,
        "placement_timeout_s": 60,
    })


def start_disagg_harness(config) -> ServerHarness:
    """The whole serving stack, started as `pdserve serve` starts it: placement groups, actors,
    pairing, backend, gRPC router, /metrics endpoints (and the file_sd file if configured)."""
    return ServerHarness.for_cluster(config)


def token_prompts(tokenizer) -> list[list[int]]:
    """Prompts that fill 1-3 blocks exactly, end just after or mid-block, plus chat prompts."""
    base = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)
    exact = [base[:n] for n in (16, 32, 48)]
    ragged = [base[:n] for n in (17, 33, 5, 40, 63)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in (
        "What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
        "Translate 'good morning' into French.", "What is 12 times 11?", "Say hello in Japanese.",
        "Give me a fun fact about octopuses.", "What is the boiling point of water?")]
    return exact + ragged + chats


GREEDY_16 = SamplingParams(max_tokens=16, temperature=0.0)

