"""The serving cluster for the multi-GPU benchmarks: a private Ray, a disaggregated cluster of
any pool layout (`cluster.serve.ServingCluster`, as `pdserve serve` starts it), and streams
read token by token with the router's own timing of each request.

On CUDA every rank of every instance owns a GPU (`gpus_per_instance` = its tensor parallel
size) and the KV goes over NCCL; on CPU (`--device cpu --tiny`) the same cluster runs Gloo
instances on a Ray node with 8 logical CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.multigpu_common import NCCL_SAFE_ENV, RunMode

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_RAY_CPUS = 8  # logical CPUs of the dry run's Ray node (instances only reserve them)


@dataclass(frozen=True, slots=True)
class PoolLayout:
    """One pool: how many instances, each of how many tensor-parallel ranks."""

    num_instances: int
    tp: int

    @property
    def num_gpus(self) -> int:
        return self.num_instances * self.tp

    def __str__(self) -> str:
        return f"{self.num_instances}x TP={self.tp}"


@dataclass(frozen=True, slots=True)
class ClusterLayout:
    name: str
    prefill: PoolLayout
    decode: PoolLayout

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus


def start_ray(mode: RunMode) -> None:
    """A private one-node Ray on loopback whose workers inherit the NCCL safety variables."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node IP 127.0.0.1
    import ray

    if ray.is_initialized():
        return
    env = {**NCCL_SAFE_ENV, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address="local", num_cpus=CPU_RAY_CPUS if mode.device == "cpu" else None,
             include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": env})


def cluster_config(folder: Path, mode: RunMode, layout: ClusterLayout, max_prompt: int,
                   num_kv_blocks: int | None = None):
    """The cluster of `layout` serving `folder`; loopback and free ports everywhere."""
    from cluster.config import cluster_config_from_dict

    def pool(p: PoolLayout, role: str) -> dict:
        per_gpu = {"gpus_per_instance": p.tp, "cpus_per_instance": 2 * p.tp}
        cpu = {"gpus_per_instance": 0, "cpus_per_instance": 1}
        return {"num_instances": p.num_instances, "tensor_parallel_size": p.tp,
                "collective_timeout_s": 300.0, "num_kv_blocks": num_kv_blocks,
                "max_num_seqs": 64 if role == "prefill" else 256,
                "max_num_batched_tokens": max(2048, max_prompt) if role == "prefill" else 2048,
                "prefix_caching": False,  # every repeat of a prompt is computed and sent in full
                **(cpu if mode.device == "cpu" else per_gpu)}

    return cluster_config_from_dict({
        "model": str(folder), "device": mode.device, "dtype": mode.dtype, "block_size": 16,
        "prefill": pool(layout.prefill, "prefill"), "decode": pool(layout.decode, "decode"),
        "server": {"grpc_host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0,
                   "worker_metrics_port_base": 0, "max_queued_requests": 4096},
        "transfer": {"timeout_s": 120}, "placement_timeout_s": 600,
        "name": f"bench-{layout.name}",
    })


@contextlib.asynccontextmanager
async def running_cluster(config) -> AsyncIterator[tuple[object, object]]:
    """(cluster, client) until the block ends; the cluster is stopped either way."""
    from cluster.serve import ServingCluster
    from router.client import PdserveClient

    cluster = await ServingCluster.start(config)
    client = PdserveClient(cluster.router.address)
    try:
        yield cluster, client
    finally:
        await client.close()
        await cluster.stop(grace_s=1.0)


@dataclass(slots=True)
class Streamed:
    """One greedy request as the client saw it, with the router's timing."""

    token_ids: list[int]
    ttft_s: float
    e2e_s: float
    kv_transfer_s: float
    prefill_s: float


async def stream_greedy(client, prompt: list[int], max_tokens: int,
                        timeout_s: float = 300.0) -> Streamed:
    started = time.perf_counter()
    tokens: list[int] = []
    ttft_s, timing = 0.0, None
    async for response in client.generate_stream(prompt_token_ids=prompt, max_tokens=max_tokens,
                                                 temperature=0.0, ignore_eos=True,
                                                 timeout_s=timeout_s):
        if response.token_ids and not tokens:
            ttft_s = time.perf_counter() - started
        tokens += list(response.token_ids)
        if response.finish_reason:
            timing = response.timing
    if timing is None:
        raise RuntimeError(f"the stream of a {len(prompt)}-token prompt ended without a finish")
    return Streamed(tokens, ttft_s, time.perf_counter() - started, timing.kv_transfer_s,
                    timing.prefill_s)


async def warm_up(client, vocab_size: int, num_requests: int = 4) -> None:
    """Every instance compiles its first shapes before a clock starts."""
    prompt = [100 + i % (vocab_size - 100) for i in range(40)]
    await asyncio.gather(*(stream_greedy(client, prompt, 4) for _ in range(num_requests)))
