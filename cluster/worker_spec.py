"""What one worker actor needs to start: a typed spec built from the cluster config."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from engine.config import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig,
                           SpeculativeConfig)
from kv_transfer import DEFAULT_MIN_MESSAGE_BYTES, FaultInjection
from pdserve.metrics import MetricsEndpoint, start_metrics_server

# NVLink multicast can take the host's GPUs out of service: keep it off in every process.
# Lazy CUDA module loading can deadlock a kernel launch behind a pending NCCL receive, so KV
# channels over NCCL require eager loading (kv_transfer.channel refuses otherwise).
GPU_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1", "CUDA_MODULE_LOADING": "EAGER"}


@dataclass(slots=True)
class WorkerSpec:
    """One prefill or decode instance; with `engine.parallel` above one rank, this actor is
    rank 0 and starts the others (cluster/rank_actors.py) on `rank_bundles[1:]`."""

    instance_id: str  # e.g. "prefill-0"; unique in the cluster, no '/'
    role: str  # "prefill" | "decode"
    engine: EngineConfig
    host: str = "127.0.0.1"  # address its KV channels listen on
    transfer_timeout_s: float = 30.0
    layers_per_message: int = 1
    min_message_bytes: int = DEFAULT_MIN_MESSAGE_BYTES
    faults: FaultInjection = field(default_factory=FaultInjection)  # prefill side only
    num_threads: int = 1  # torch intra-op threads for a CPU instance
    metrics_port: int = 0  # its Prometheus /metrics port; 0 = any free port
    fail_after_steps: int = 0  # fault injection: the engine thread raises after this many steps
    max_waiting_requests: int = 0  # decode only: its queue bound; 0 = 4 x max_num_seqs
    rank_bundles: tuple[dict[str, float], ...] = ()  # its placement group's bundles, by rank

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if not self.instance_id or "/" in self.instance_id:
            raise ValueError(f"instance_id must be non-empty without '/', got {self.instance_id!r}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0 (0 = 4 x max_num_seqs), "
                             f"got {self.max_waiting_requests}")

    @property
    def transport_device(self) -> str:
        """Where KV moves: NCCL between GPUs, Gloo on CPU."""
        return "cuda" if self.engine.device == "cuda" else "cpu"


def build_engine(spec: WorkerSpec, rank_service=None):
    """The instance's LLMEngine; ranks 1..N-1 of a multi-rank one as Ray actors on the
    instance's placement group bundles, each with `rank_service` (rank_calls.py)."""
    from engine.llm_engine import LLMEngine

    if spec.engine.parallel.world_size == 1:
        return LLMEngine(spec.engine)
    import ray

    from cluster.rank_actors import RayRankLauncher

    # rank r is "<this actor's name>-rank<r>": unique per deployment and incarnation
    name = ray.get_runtime_context().get_actor_name() or spec.instance_id
    launcher = RayRankLauncher(name, spec.rank_bundles, dict(GPU_SAFE_ENV),
                               num_threads=spec.num_threads)
    return LLMEngine(spec.engine, launcher=launcher, rank_service=rank_service)


def apply_process_settings(spec: WorkerSpec) -> None:
    """Per-process settings every worker applies first thing in its actor."""
    import torch

    os.environ.update(GPU_SAFE_ENV)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.engine.device == "cpu":
        torch.set_num_threads(max(1, spec.num_threads))


def serve_worker_metrics(spec: WorkerSpec, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve a worker's registry on its node: on `spec.host` when that is a loopback address (a
    local cluster), else on the node's own IP, which is where Prometheus finds it."""
    host = spec.host
    if not _is_loopback(host):
        import ray

        host = ray.util.get_node_ip_address()
    return start_metrics_server(registry, host, spec.metrics_port)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def engine_config_for(model: str, device: str, dtype: str, block_size: int, num_blocks: int | None,
                      max_num_seqs: int, max_num_batched_tokens: int,
                      gpu_memory_utilization: float,
                      async_scheduling: bool | None = None,
                      use_cuda_graphs: bool = True,
                      parallel: ParallelConfig | None = None,
                      enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                      speculative: SpeculativeConfig | None = None) -> EngineConfig:
    return EngineConfig(model=model, device=device, dtype=dtype, async_scheduling=async_scheduling,
                        use_cuda_graphs=use_cuda_graphs, parallel=parallel or ParallelConfig(),
                        speculative=speculative or SpeculativeConfig(),
                        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                          gpu_memory_utilization=gpu_memory_utilization,
                                          enable_prefix_caching=enable_prefix_caching,
                                          kv_cache_dtype=kv_cache_dtype),
                        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                  max_num_batched_tokens=max_num_batched_tokens))
