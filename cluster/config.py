"""Cluster configuration: which engines run where, read from one YAML file.

The file has one section per concern; each section is a frozen dataclass validated when it is
built, whether from YAML, from CLI overrides or from code:

    model: default          # ClusterConfig: model, device, dtype, block_size, ...
    prefill: {...}          # PoolConfig with role "prefill"
    decode: {...}           # PoolConfig with role "decode"
    server: {...}           # ServerConfig: the router's gRPC and metrics endpoints
    transfer: {...}         # TransferConfig: prefill -> decode KV transfer
    supervision: {...}      # SupervisionConfig: health polling and the step watchdog
    routing: {...}          # RoutingConfig: which instances a request goes to (router/policy.py)

Only `cluster_config_from_dict` (and `load_cluster_config` around it) knows the YAML shape;
the rest of pdserve receives a `ClusterConfig`. Every error names the key by its path
(`decode.num_instances`) so the message points at the line to fix.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from cluster.config_checks import (at_least, check_parallelism, check_port, check_types,
                                   join_path, one_of, positive)
from cluster.server_config import ServerConfig
from engine.config import SpeculativeConfig
from engine.kv_cache.fp8 import KV_CACHE_DTYPES
from router.policy import RoutingConfig
from kv_transfer.descriptors import DEFAULT_MIN_MESSAGE_BYTES

ROLES = ("prefill", "decode")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRANSFER_BACKENDS = ("auto", "gloo", "nccl")
MAX_NAME_LEN = 40  # a deployment name; placement group names add "-decode-<index>"
DEPLOYMENT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_NAME_LEN - 1}}}")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One pool of identical engine instances: every prefill worker, or every decode worker.

    An instance is one model replica. It owns `gpus_per_instance` GPUs, one per rank, which a
    placement group reserves together on one node (see cluster/placement.py).
    """

    role: str  # "prefill" or "decode"; set by the YAML section the pool is read from
    num_instances: int = 1  # prefill >= 1; decode may be 0, the router then answers UNAVAILABLE
    gpus_per_instance: int = 0  # 0 = CPU instance; otherwise tensor * pipeline parallel size
    cpus_per_instance: float = 1.0  # CPU cores reserved per instance, split over its GPU ranks
    # Ranks per instance, tensor x pipeline (pools may differ: the hand-off re-shards the KV)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # MoE models only: 1, or tensor_parallel_size to split whole experts over the tensor ranks
    # (attention stays tensor parallel; engine/layers/moe.py). A dense model refuses > 1.
    expert_parallel_size: int = 1
    # A rank's plan, collective or start-up not done within this fails the whole instance.
    collective_timeout_s: float = 60.0
    # Per-instance engine limits; defaults as in engine/config.py.
    max_num_seqs: int = 64  # requests in the running batch
    max_num_batched_tokens: int = 2048  # tokens in one engine step, >= max_num_seqs
    num_kv_blocks: int | None = None  # KV blocks per instance; None = derive from memory
    gpu_memory_utilization: float = 0.85  # share of free GPU memory the KV pool may take
    # Launch step N+1 before reading step N back (engine/inflight.py); None = on for GPU pools.
    # Only decode pools run engine steps this way; prefill workers step synchronously.
    async_scheduling: bool | None = None
    # Decode only: requests one instance lets wait (reserved, queued or preempted); beyond it a
    # reservation is refused, and RESOURCE_EXHAUSTED when every decode instance refuses.
    # 0 = 4 x max_num_seqs (decode_worker/worker.py). A prefill pool has no such queue: must be 0.
    max_waiting_requests: int = 0
    # Reuse cached KV of shared prompt prefixes (engine/kv_cache/prefix_cache.py); on a decode
    # pool it also means a hand-off sends only the blocks the instance does not hold.
    prefix_caching: bool = True
    # "auto" (the model's dtype) or "fp8_e4m3" (engine/kv_cache/fp8.py); both pools alike
    kv_cache_dtype: str = "auto"
    # Decode only: speculative decoding (engine/spec/): null, "ngram" or "draft_model"; k drafts;
    # "draft_model": the draft ("default", HF dir, .gguf) of the model's vocabulary; one rank
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    draft_model: str | None = None

    def __post_init__(self) -> None:
        one_of("role", self.role, ROLES)
        one_of(self._path("kv_cache_dtype"), self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.speculative_method is not None and self.role != "decode":
            raise ValueError(f"{self._path('speculative_method')} must be null: only decode "
                             f"instances decode, got {self.speculative_method!r}")
        self.speculative_config()  # validates the method, k and draft_model
        if self.draft_model and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(f"{self._path('draft_model')} needs one-rank instances "
                             f"(tensor_parallel_size and pipeline_parallel_size 1)")
        check_types(self, self.role)
        min_instances = 1 if self.role == "prefill" else 0
        at_least(self._path("num_instances"), self.num_instances, min_instances)
        at_least(self._path("gpus_per_instance"), self.gpus_per_instance, 0)
        at_least(self._path("cpus_per_instance"), self.cpus_per_instance, 0)
        if self.gpus_per_instance == 0 and self.cpus_per_instance <= 0:
            raise ValueError(
                f"{self._path('cpus_per_instance')} must be > 0 for a CPU instance "
                f"(gpus_per_instance 0), got {self.cpus_per_instance}"
            )
        check_parallelism(self, self.role)
        positive(self._path("collective_timeout_s"), self.collective_timeout_s)
        at_least(self._path("max_num_seqs"), self.max_num_seqs, 1)
        at_least(self._path("max_waiting_requests"), self.max_waiting_requests, 0)
        if self.role == "prefill" and self.max_waiting_requests:
            raise ValueError("prefill.max_waiting_requests must be 0 (prefill has no decode queue; "
                             f"set decode.max_waiting_requests), got {self.max_waiting_requests}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"{self._path('max_num_batched_tokens')} must be >= max_num_seqs "
                f"({self.max_num_seqs}), got {self.max_num_batched_tokens}"
            )
        if self.num_kv_blocks is not None:
            at_least(self._path("num_kv_blocks"), self.num_kv_blocks, 1)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"{self._path('gpu_memory_utilization')} must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )

    def speculative_config(self) -> SpeculativeConfig:
        try:
            return SpeculativeConfig(self.speculative_method, self.num_speculative_tokens,
                                     draft_model=self.draft_model)
        except ValueError as exc:
            raise ValueError(f"{self.role} speculative decoding: {exc}") from None

    @property
    def device(self) -> str:
        """Where this pool's engines run: "cuda" when an instance owns GPUs, else "cpu"."""
        return "cuda" if self.gpus_per_instance > 0 else "cpu"

    def _path(self, name: str) -> str:
        return f"{self.role}.{name}"


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How prefill instances hand KV blocks to decode instances."""

    timeout_s: float = 30.0  # an unacknowledged transfer fails then, and its blocks are freed
    layers_per_message: int = 1  # KV layers per message at least: more = fewer, larger messages
    # ... and enough layers that a message carries this many bytes (short prompts' KV is small:
    # one message per layer would be slow on NCCL); 0 = layers_per_message alone
    min_message_bytes: int = DEFAULT_MIN_MESSAGE_BYTES
    backend: str = "auto"  # "gloo" (any device), "nccl" (GPU to GPU), "auto": nccl if both GPU
    store_port_base: int = 0  # rendezvous store ports start here; 0 = pick free ports

    def __post_init__(self) -> None:
        check_types(self, "transfer")
        positive("transfer.timeout_s", self.timeout_s)
        at_least("transfer.layers_per_message", self.layers_per_message, 1)
        at_least("transfer.min_message_bytes", self.min_message_bytes, 0)
        one_of("transfer.backend", self.backend, TRANSFER_BACKENDS)
        check_port("transfer.store_port_base", self.store_port_base)


@dataclass(frozen=True, slots=True)
class SupervisionConfig:
    """How the router watches its instances (cluster/lifecycle.py): a dead or wedged instance is
    detected within about poll_interval_s + health_timeout_s, or once a step passes the watchdog."""

    poll_interval_s: float = 1.0  # one health call per instance this often
    health_timeout_s: float = 10.0  # an instance that cannot answer health within this is wedged
    step_timeout_s: float = 120.0  # one engine step running longer than this is wedged
    replace_dead: bool = True  # start a new instance (new placement group) for each dead one
    restart_backoff_s: float = 1.0  # wait before the 2nd consecutive restart; doubles each time
    restart_backoff_max_s: float = 60.0  # the longest wait between restarts
    stable_after_s: float = 60.0  # an instance ready this long resets its restart backoff
    max_migrations: int = 3  # times one request may move after an instance died; 0 = never
    migration_wait_s: float = 120.0  # a moving request waits this long (within its deadline)
    #                                  for a live instance, then ends with UNAVAILABLE
    drain_timeout_s: float = 30.0  # SIGTERM / drain: in-flight requests get this long to finish
    # Fault injection (tests, chaos runs): this instance's first incarnation crashes its engine
    # thread after this many steps, as a raising step would. "" / 0 = off.
    inject_engine_failure: str = ""
    inject_engine_failure_after_steps: int = 0

    def __post_init__(self) -> None:
        check_types(self, "supervision")
        for name in ("poll_interval_s", "health_timeout_s", "step_timeout_s",
                     "restart_backoff_s", "restart_backoff_max_s", "stable_after_s",
                     "migration_wait_s", "drain_timeout_s"):
            positive(f"supervision.{name}", getattr(self, name))
        at_least("supervision.max_migrations", self.max_migrations, 0)
        at_least("supervision.inject_engine_failure_after_steps",
                 self.inject_engine_failure_after_steps, 0)


def _default_pool(role: str) -> PoolConfig:
    return PoolConfig(role=role)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything `pdserve serve` needs: the model, both pools, the server and the transfer."""

    model: str = "default"  # "default", an HF model directory, or a .gguf file
    device: str = "auto"  # "cpu", "cuda", or "auto": CUDA exactly for instances that own GPUs
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA (as the engine resolves)
    block_size: int = 16  # tokens per KV block, shared by both pools so blocks move 1:1
    prefill: PoolConfig = field(default_factory=functools.partial(_default_pool, "prefill"))
    decode: PoolConfig = field(default_factory=functools.partial(_default_pool, "decode"))
    server: ServerConfig = field(default_factory=ServerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # policy: kv_aware, ...
    placement_timeout_s: float = 60.0  # wait this long for an instance's GPUs/CPUs, then fail
    # "local": a private Ray instance for this deployment alone (cluster/ray_runtime.py);
    # "auto": the cluster running on this node (`ray start`); else host:port of its GCS.
    ray_address: str = "local"
    # This deployment's Ray namespace and the prefix of its actor and placement group names:
    # deployments sharing one Ray cluster need different names.
    name: str = "pdserve"
    # Conditional disaggregation (0 = off): a request whose prompt the chosen decode instance
    # already caches but for fewer than this many tokens is prefilled there, skipping the
    # prefill pool and the transfer (needs decode.prefix_caching).
    conditional_disagg_max_uncached_tokens: int = 0

    def __post_init__(self) -> None:
        check_types(self, "")
        if not self.model:
            raise ValueError("model must not be empty")
        one_of("device", self.device, DEVICES)
        one_of("dtype", self.dtype, DTYPES)
        at_least("block_size", self.block_size, 1)
        at_least("conditional_disagg_max_uncached_tokens",
                 self.conditional_disagg_max_uncached_tokens, 0)
        positive("placement_timeout_s", self.placement_timeout_s)
        if not self.ray_address:
            raise ValueError('ray_address must not be empty; use "local" (a private Ray), '
                             '"auto" (the cluster running on this node) or host:port')
        _deployment_name(self.name)
        for role, pool in zip(ROLES, self.pools):
            if pool.role != role:
                raise ValueError(f"{role}.role must be {role!r}, got {pool.role!r}")
            self._check_pool_device(pool)
        if self.prefill.kv_cache_dtype != self.decode.kv_cache_dtype:
            raise ValueError(f"prefill.kv_cache_dtype and decode.kv_cache_dtype must match (KV "
                             f"moves between them as stored): prefill is "
                             f"{self.prefill.kv_cache_dtype}, decode is {self.decode.kv_cache_dtype}")
        if self.transfer.backend == "nccl":
            for pool in self.pools:
                if pool.device != "cuda":
                    raise ValueError(
                        f"transfer.backend nccl needs GPU instances in both pools, "
                        f"but {pool.role}.gpus_per_instance is 0"
                    )

    @property
    def pools(self) -> tuple[PoolConfig, PoolConfig]:
        """The prefill pool, then the decode pool."""
        return (self.prefill, self.decode)

    def _check_pool_device(self, pool: PoolConfig) -> None:
        if self.device == "cuda" and pool.gpus_per_instance == 0:
            raise ValueError(
                f"{pool.role}.gpus_per_instance must be >= 1 when device is cuda, got 0"
            )
        if self.device == "cpu" and pool.gpus_per_instance > 0:
            raise ValueError(
                f"{pool.role}.gpus_per_instance must be 0 when device is cpu, "
                f"got {pool.gpus_per_instance}"
            )


# ---------------------------------------------------------------- YAML and CLI edge


def load_cluster_config(path: str | PathLike[str]) -> ClusterConfig:
    """Read a cluster config YAML file; errors start with the file name."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    try:
        return cluster_config_from_dict({} if data is None else data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def cluster_config_from_dict(data: Mapping[str, Any]) -> ClusterConfig:
    """Build a ClusterConfig from parsed YAML; missing keys take their defaults."""
    kwargs = _section(data, "", ClusterConfig)
    for name, cls in (("server", ServerConfig), ("transfer", TransferConfig),
                      ("supervision", SupervisionConfig), ("routing", RoutingConfig)):
        if name in kwargs:
            kwargs[name] = cls(**_section(kwargs[name], name, cls))
    for role in ROLES:
        if role in kwargs:
            kwargs[role] = _pool_from_dict(kwargs[role], role)
    return ClusterConfig(**kwargs)


# CLI flag (argparse dest) -> the config field it sets.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "model": ("model",),
    "prefill_instances": ("prefill", "num_instances"),
    "decode_instances": ("decode", "num_instances"),
    "grpc_host": ("server", "grpc_host"),
    "grpc_port": ("server", "grpc_port"),
    "metrics_port": ("server", "metrics_port"),
    "http_port": ("server", "http_port"),
    "http_host": ("server", "http_host"),
    "prometheus_sd_file": ("server", "prometheus_sd_file"),
    "ray_address": ("ray_address",),
    "name": ("name",),
}


def with_overrides(config: ClusterConfig, **overrides: Any) -> ClusterConfig:
    """Apply CLI flags (--model, --prefill-instances, --decode-instances, --host (grpc_host),
    --grpc-port, --metrics-port, --http-port, --http-host, --prometheus-sd-file, --device,
    --no-prefix-caching as prefix_caching=False) to a
    config; a None value means the flag was not given.

    `device` also fixes the pools' GPU counts when they contradict it, so `--device cuda` on a
    CPU config gives each instance one GPU and `--device cpu` drops the GPUs.
    """
    known = sorted([*_OVERRIDES, "device", "prefix_caching"])
    for name, value in overrides.items():
        if name not in known:
            raise ValueError(f"unknown override {name!r}; known: {', '.join(known)}")
        if value is None:
            continue
        if name == "device":
            config = _with_device(config, value)
        elif name == "prefix_caching":  # --no-prefix-caching: both pools
            config = replace(config, **{p.role: replace(p, prefix_caching=value)
                                        for p in config.pools})
        else:
            config = _replace_at(config, _OVERRIDES[name], value)
    return config


def _with_device(config: ClusterConfig, device: str) -> ClusterConfig:
    one_of("device", device, DEVICES)
    pools = {}
    for pool in config.pools:
        if device == "cuda" and pool.gpus_per_instance == 0:
            ranks = pool.tensor_parallel_size * pool.pipeline_parallel_size
            pools[pool.role] = replace(pool, gpus_per_instance=ranks)
        elif device == "cpu" and pool.gpus_per_instance > 0:
            pools[pool.role] = replace(pool, gpus_per_instance=0)
    return replace(config, device=device, **pools)


def _replace_at(config: Any, path: tuple[str, ...], value: Any) -> Any:
    head, *rest = path
    new_value = _replace_at(getattr(config, head), tuple(rest), value) if rest else value
    return replace(config, **{head: new_value})


def _pool_from_dict(data: Any, role: str) -> PoolConfig:
    kwargs = _section(data, role, PoolConfig)
    if kwargs.setdefault("role", role) != role:
        raise ValueError(
            f"{role}.role is set by the section name; remove it (got {kwargs['role']!r})"
        )
    return PoolConfig(**kwargs)


def _section(data: Any, path: str, cls: type) -> dict[str, Any]:
    """The keys of one YAML mapping, checked against `cls`'s fields."""
    if data is None:  # `server:` with nothing under it
        return {}
    if not isinstance(data, Mapping):
        where = path or "the cluster config"
        raise ValueError(f"{where} must be a mapping of keys, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(_unknown_key_message(join_path(path, str(key)), str(key), known))
    return dict(data)


def _unknown_key_message(key_path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"{key_path}: unknown key; did you mean {close[0]}?"
    return f"{key_path}: unknown key; known keys: {', '.join(known)}"


def _deployment_name(name: str) -> None:
    if not DEPLOYMENT_NAME.fullmatch(name):
        raise ValueError(
            f"name must be 1-{MAX_NAME_LEN} characters, letters, digits, '-' or '_', starting "
            f"with a letter or digit (it names the Ray namespace and actors), got {name!r}"
        )
