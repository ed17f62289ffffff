"""Starting and stopping the prefill and decode pools as Ray actors, and pairing them.

Each instance is one actor in its own placement group. After every actor has loaded its model,
each (prefill, decode) pair builds its KV channel: the decode side hosts a rendezvous store, both
ends handshake (a layout mismatch fails here, at startup, naming both instances), and the
standalone two-rank process group is formed. Pairs are independent: adding or removing an
instance touches only its own pairs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

import ray

from cluster.config import ClusterConfig, PoolConfig
from cluster.config_checks import check_expert_parallel_fits, check_layouts_map
from cluster.placement import (
    InstancePlacement,
    actor_name,
    create_cluster_placements,
    remove_placement,
)
from cluster.worker_spec import GPU_SAFE_ENV, WorkerSpec, engine_config_for
from engine.config import ParallelConfig
from engine.loader.source import open_model
from decode_worker.actor import DecodeActor
from prefill_worker.actor import PrefillActor

log = logging.getLogger(__name__)
PAIR_TIMEOUT_S = 120.0  # building one pair channel (both handshakes) takes at most this


class ClusterStartupError(RuntimeError):
    """The pools could not be brought up; the message says which instance and why."""


@dataclass(slots=True)
class Worker:
    spec: WorkerSpec
    actor: object  # a Ray ActorHandle
    placement: InstancePlacement | None = None
    metrics_address: str = ""  # host:port of its /metrics, as the actor reported it


@dataclass(slots=True)
class Pools:
    prefill: list[Worker] = field(default_factory=list)
    decode: list[Worker] = field(default_factory=list)

    @property
    def all(self) -> list[Worker]:
        return self.prefill + self.decode

    async def stop(self) -> None:
        """Stop engines, kill actors, release placement groups (bounded in time)."""
        await self.stop_workers(self.all)

    @staticmethod
    async def stop_workers(workers: list[Worker]) -> None:
        calls = [asyncio.ensure_future(await_ref(w.actor.shutdown.remote())) for w in workers]
        if calls:
            await asyncio.wait(calls, timeout=10)
        for w in workers:
            release(w)


async def await_ref(ref):
    """A Ray ObjectRef as a coroutine (for asyncio.wait_for / ensure_future)."""
    return await ref


def worker_specs(cfg: ClusterConfig, host: str) -> tuple[list[WorkerSpec], list[WorkerSpec]]:
    """One spec per instance of each pool, from the cluster config. Metrics ports: instance k
    (prefill instances first, then decode) gets server.worker_metrics_port_base + k, or any
    free port when the base is 0."""
    def specs(pool: PoolConfig, first_index: int) -> list[WorkerSpec]:
        engine = engine_config_for(cfg.model, pool.device, cfg.dtype, cfg.block_size,
                                   pool.num_kv_blocks, pool.max_num_seqs,
                                   pool.max_num_batched_tokens, pool.gpu_memory_utilization,
                                   pool.async_scheduling,
                                   # prefill instances too: their short prompts replay the
                                   # captured graphs as rows (EngineConfig.graph_prefill_max_context)
                                   use_cuda_graphs=True,
                                   enable_prefix_caching=pool.prefix_caching,
                                   kv_cache_dtype=pool.kv_cache_dtype,
                                   speculative=pool.speculative_config(),
                                   parallel=ParallelConfig(
                                       pool.tensor_parallel_size, pool.pipeline_parallel_size,
                                       expert_parallel_size=pool.expert_parallel_size,
                                       collective_timeout_s=pool.collective_timeout_s))
        ranks = pool.tensor_parallel_size * pool.pipeline_parallel_size
        faults = cfg.supervision
        return [WorkerSpec(f"{pool.role}-{i}", pool.role, engine, host=host,
                           transfer_timeout_s=cfg.transfer.timeout_s,
                           layers_per_message=cfg.transfer.layers_per_message,
                           min_message_bytes=cfg.transfer.min_message_bytes,
                           # whole cores per rank, at least one thread (0.5 cores: one)
                           num_threads=max(1, int(pool.cpus_per_instance / ranks)),
                           metrics_port=_metrics_port(cfg, first_index + i),
                           max_waiting_requests=pool.max_waiting_requests,
                           fail_after_steps=(faults.inject_engine_failure_after_steps
                                             if faults.inject_engine_failure == f"{pool.role}-{i}"
                                             else 0))
                for i in range(pool.num_instances)]

    return specs(cfg.prefill, 0), specs(cfg.decode, cfg.prefill.num_instances)


def _metrics_port(cfg: ClusterConfig, index: int) -> int:
    base = cfg.server.worker_metrics_port_base
    if base and base + index > 65535:
        raise ValueError(f"server.worker_metrics_port_base {base} leaves no port for instance "
                         f"{index}; lower it")
    return base + index if base else 0


def create_worker(spec: WorkerSpec, placement: InstancePlacement | None,
                  incarnation: int = 0) -> Worker:
    """Create an instance's actor (it loads its model in the background: see `await_started`)."""
    cls = PrefillActor if spec.role == "prefill" else DecodeActor
    options = _actor_options(spec, placement, incarnation)
    if placement is not None:
        spec = replace(spec, rank_bundles=placement.bundles)
    return Worker(spec, ray.remote(cls).options(**options).remote(spec), placement)


async def await_started(worker: Worker) -> None:
    """Wait until the actor has loaded its model; ClusterStartupError if it died instead."""
    info = await _checked(worker, worker.actor.info.remote())
    worker.metrics_address = info["metrics_address"]


def kill_actor(worker: Worker) -> None:
    """Kill an instance's actor (idempotent, never raises); its placement group stays."""
    try:
        ray.kill(worker.actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        log.debug("kill of %s failed", worker.spec.instance_id, exc_info=True)


def release(worker: Worker) -> None:
    """Kill an instance's actor and free its placement group (idempotent, never raises)."""
    kill_actor(worker)
    placement, worker.placement = worker.placement, None
    if placement is not None:
        try:
            remove_placement(placement)
        except Exception:  # noqa: BLE001 - already removed
            log.debug("removing %s failed", placement.name, exc_info=True)


def _actor_options(spec: WorkerSpec, placement: InstancePlacement | None,
                   incarnation: int = 0) -> dict:
    """Ray options of an instance's actor. It asks for exactly what its bundle holds (rank 0's:
    a CPU instance's cores, a GPU rank's GPU and its share of the cores): asking for more, Ray
    cannot fit it into the bundle. Without a placement (tests): one GPU, or one core."""
    if placement is None:
        on_gpu = spec.engine.device == "cuda"
        resources = {"GPU": 1.0} if on_gpu else {"CPU": 1.0}
        name = actor_name("pdserve", spec.instance_id)
        name = f"{name}-r{incarnation}" if incarnation else name
    else:
        resources = placement.bundles[0]
        name = placement.name  # "{deployment}-{instance_id}", plus "-r{n}" for a replacement
    options = {"num_gpus": resources.get("GPU", 0.0), "num_cpus": resources.get("CPU", 0.0),
               "max_concurrency": 1000, "name": name,
               "runtime_env": {"env_vars": dict(GPU_SAFE_ENV)}}
    if placement is not None:
        options["scheduling_strategy"] = placement.scheduling_strategy(0)
    return options


async def launch(prefill_specs: list[WorkerSpec], decode_specs: list[WorkerSpec],
                 placements: dict[str, InstancePlacement] | None = None) -> Pools:
    """Create the actors, wait for their models, then pair every prefill with every decode."""
    placements = placements or {}
    pools = Pools()
    pools.prefill = [create_worker(s, placements.get(s.instance_id)) for s in prefill_specs]
    pools.decode = [create_worker(s, placements.get(s.instance_id)) for s in decode_specs]
    try:
        await asyncio.gather(*(await_started(w) for w in pools.all))
        await asyncio.gather(*(pair(p, d, generation=0) for p in pools.prefill for d in pools.decode))
    except BaseException:
        await pools.stop()
        raise
    return pools


async def pair(prefill: Worker, decode: Worker, generation: int) -> None:
    """Build the KV channel of one (prefill, decode) pair; both ends connect concurrently,
    within PAIR_TIMEOUT_S (a peer that hangs fails the pairing instead of stalling it)."""
    pid, did = prefill.spec.instance_id, decode.spec.instance_id

    async def connect() -> None:
        endpoint = await decode.actor.endpoint.remote(pid, generation)
        await asyncio.gather(decode.actor.accept.remote(pid, generation),
                             prefill.actor.connect.remote(did, endpoint, decode.actor))
    try:
        await asyncio.wait_for(connect(), PAIR_TIMEOUT_S)
    except ray.exceptions.RayError as exc:
        raise ClusterStartupError(f"cannot pair {pid} with {did}: {_cause(exc)}") from None
    except asyncio.TimeoutError:
        raise ClusterStartupError(f"cannot pair {pid} with {did}: no answer within "
                                  f"{PAIR_TIMEOUT_S:g} s") from None


async def _checked(worker: Worker, ref):
    try:
        return await ref
    except ray.exceptions.RayActorError as exc:
        raise ClusterStartupError(f"{worker.spec.instance_id} failed to start: {_cause(exc)}") from None


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause) if cause is not None else str(exc)
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


async def start_cluster(cfg: ClusterConfig, host: str = "127.0.0.1") -> Pools:
    """Reserve placement groups for every instance and launch the pools on them (first: the
    pools' layouts must each hold the model, so that KV can be re-sharded between them)."""
    model_config = (await asyncio.to_thread(open_model, cfg.model)).config
    check_layouts_map(cfg.prefill, cfg.decode, model_config)
    for pool in cfg.pools:
        check_expert_parallel_fits(pool, model_config)
    placements = await asyncio.to_thread(create_cluster_placements, cfg)
    by_id = {f"{p.role}-{p.instance_index}": p for p in placements}
    prefill_specs, decode_specs = worker_specs(cfg, host)
    try:
        return await launch(prefill_specs, decode_specs, by_id)
    except BaseException:
        for placement in placements:
            remove_placement(placement)
        raise


__all__ = ["ClusterStartupError", "Pools", "Worker", "await_ref", "await_started", "create_worker",
           "kill_actor", "launch", "pair", "release", "start_cluster", "worker_specs"]
