"""Fixture pieces for tests that run the real disaggregated cluster on a local Ray."""

from __future__ import annotations

import os
from contextlib import contextmanager
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
    with this process connected to it as the driver until the block ends."""
    with local_cluster(1, num_cpus=num_cpus) as address:
        ray.init(address=address, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                           "TOKENIZERS_PARALLELISM": "false"}})
        try:
            yield
        finally:
            ray.shutdown()


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

