"""`pdserve serve`: start (or join) Ray, launch the pools, put the router in front.

`ServingCluster` is the whole running system as one object, so the CLI and the tests start and
stop it the same way: pools, backend, router (gRPC and its /metrics) and the Prometheus file_sd
file listing every /metrics endpoint (cluster/metrics_sd.py), kept current while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

from cluster.config import ClusterConfig
from cluster.disagg_backend import DisaggregatedBackend
from cluster.metrics_sd import MetricsTarget, PrometheusTargetsFile
from cluster.pools import start_cluster
from cluster.recovery import PoolRecovery
from engine.loader.source import open_model
from router.server import RouterServer, start_router

log = logging.getLogger(__name__)

TARGETS_REFRESH_S = 5.0  # how often the file_sd file is checked against the pools
ROUTER_INSTANCE = "router-0"
_ANY_HOST = ("0.0.0.0", "::", "")


@dataclass(slots=True)
class ServingCluster:
    """A running pdserve: Ray worker pools plus the router (gRPC, and the OpenAI-compatible
    HTTP API when `server.http_port` is set)."""

    config: ClusterConfig
    backend: DisaggregatedBackend
    router: RouterServer
    node_host: str  # this node's address as other nodes reach it (the worker host)
    targets_file: PrometheusTargetsFile | None = None
    _targets_task: asyncio.Task | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, config: ClusterConfig, worker_host: str = "127.0.0.1") -> ServingCluster:
        source = await asyncio.to_thread(open_model, config.model)
        tokenizer = await asyncio.to_thread(source.load_tokenizer)
        pools = await start_cluster(config, worker_host)
        server = config.server
        recovery = PoolRecovery(config)
        backend = DisaggregatedBackend(pools, tokenizer, source.config, server.max_queued_requests,
                                       supervision=config.supervision, recovery=recovery,
                                       routing=config.routing,
                                       conditional_disagg_max_uncached_tokens=(
                                           config.conditional_disagg_max_uncached_tokens))
        recovery.backend = backend
        try:
            router = await start_router(backend, server.grpc_host, server.grpc_port,
                                        server.metrics_port, metrics_host=server.metrics_bind_host,
                                        request_timeout_s=server.request_timeout_s,
                                        security=server.router_security(),
                                        http_port=server.http_port,
                                        http_host=server.http_bind_host)
        except BaseException:
            await backend.stop()
            raise
        for collector in backend.collectors():
            router.metrics.registry.register(collector)
        cluster = cls(config, backend, router, worker_host)
        if server.prometheus_sd_file:
            try:
                cluster._publish_targets(PrometheusTargetsFile(server.prometheus_sd_file))
            except BaseException:
                await cluster.stop()
                raise
        return cluster

    @property
    def address(self) -> str:
        return self.router.address

    def metrics_targets(self) -> list[MetricsTarget]:
        """Every /metrics endpoint now: the router's and each live instance's."""
        endpoint = self.router.metrics_endpoint
        host = self.node_host if endpoint.host in _ANY_HOST else endpoint.host
        targets = [MetricsTarget("router", ROUTER_INSTANCE, f"{host}:{endpoint.port}")]
        targets += [MetricsTarget(w.spec.role, w.spec.instance_id, w.metrics_address)
                    for w in self.backend.pools.all]
        return targets

    def _publish_targets(self, targets_file: PrometheusTargetsFile) -> None:
        targets_file.write(self.metrics_targets())
        self.targets_file = targets_file
        self._targets_task = asyncio.create_task(self._follow_targets())

    async def _follow_targets(self) -> None:
        """Instances come and go with the pools; the file follows within TARGETS_REFRESH_S."""
        while True:
            await asyncio.sleep(TARGETS_REFRESH_S)
            try:
                self.targets_file.write(self.metrics_targets())
            except OSError:
                log.exception("cannot update %s", self.targets_file.path)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Graceful shutdown's first half (SIGTERM): health NOT_SERVING and new calls
        UNAVAILABLE at once; calls in flight get `timeout_s` (supervision.drain_timeout_s) to
        finish, the rest end with UNAVAILABLE. Returns how many were ended."""
        await self.router.drain()
        return await self.backend.drain(timeout_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._targets_task is not None:
            self._targets_task.cancel()
        if self.targets_file is not None:
            self.targets_file.clear()
        await self.router.stop(grace_s)


async def serve_forever(config: ClusterConfig, worker_host: str) -> None:
    """Start, serve until SIGTERM/SIGINT (or the router ends), drain, stop.

    The signal handlers come first: a signal while the pools start (minutes for a large model)
    cancels the start, and the process still ends the normal way, which takes its private Ray
    down with it (Ray's own SIGTERM handler would abort the process and leave Ray's agents).
    """
    terminate = _termination_requested()
    starting = asyncio.ensure_future(ServingCluster.start(config, worker_host))
    if not await _finished_first(starting, terminate):
        print("pdserve: stopped while starting", flush=True)
        return
    cluster = starting.result()
    _print_serving(cluster)
    try:
        ended_alone = asyncio.ensure_future(cluster.router.wait_for_termination())
        if not await _finished_first(ended_alone, terminate):
            print(f"pdserve: draining (up to {config.supervision.drain_timeout_s:g} s)", flush=True)
            ended = await cluster.drain()
            print(f"pdserve: drained ({ended} requests ended unfinished); stopping", flush=True)
    finally:
        await cluster.stop(grace_s=1.0)
    print("pdserve: stopped", flush=True)


def _termination_requested() -> asyncio.Event:
    """Set by the first SIGTERM or SIGINT from now on."""
    terminate = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate.set)
    return terminate


async def _finished_first(work: asyncio.Future, terminate: asyncio.Event) -> bool:
    """True if `work` ended before `terminate` was set; else `work` is cancelled, and awaited
    so that its clean-up has run."""
    waiting = asyncio.ensure_future(terminate.wait())
    await asyncio.wait([work, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if work.done():
        return True
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return False


def _print_serving(cluster: ServingCluster) -> None:
    info = cluster.backend.model_info()
    pools = cluster.backend.pools
    print(f"pdserve: serving {info.model_name} on {cluster.address} "
          f"({len(pools.prefill)} prefill + {len(pools.decode)} decode instances)", flush=True)
    if cluster.router.http is not None:
        print(f"pdserve: OpenAI-compatible API on {cluster.router.http.url}/v1", flush=True)
    sd_file = cluster.config.server.prometheus_sd_file or "(no file_sd file)"
    print(f"pdserve: metrics on http://{cluster.router.metrics_endpoint.address}/metrics; "
          f"Prometheus targets in {sd_file}", flush=True)
