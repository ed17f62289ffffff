"""`pdserve serve`: join (or start) a Ray cluster, launch the pools, put the router in front.

`ServingCluster` is the whole running system as one object, so the CLI and the tests start and
stop it the same way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray

from cluster.config import ClusterConfig
from cluster.disagg_backend import DisaggregatedBackend
from cluster.pools import start_cluster
from engine.loader.source import open_model
from router.server import RouterServer, start_router

log = logging.getLogger(__name__)


def init_ray(address: str) -> None:
    """Join the cluster at `address` ("auto": the running one), else start a local one."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError:
        if address != "auto":
            raise
        log.info("no running Ray cluster found: starting a local one")
        ray.init(logging_level=logging.WARNING, include_dashboard=False)


@dataclass(slots=True)
class ServingCluster:
    """A running pdserve: Ray worker pools plus the gRPC router."""

    config: ClusterConfig
    backend: DisaggregatedBackend
    router: RouterServer

    @classmethod
    async def start(cls, config: ClusterConfig, worker_host: str = "127.0.0.1") -> ServingCluster:
        source = await asyncio.to_thread(open_model, config.model)
        tokenizer = await asyncio.to_thread(source.load_tokenizer)
        pools = await start_cluster(config, worker_host)
        backend = DisaggregatedBackend(pools, tokenizer, source.config,
                                       config.server.max_queued_requests)
        router = await start_router(backend, config.server.grpc_host, config.server.grpc_port)
        return cls(config, backend, router)

    @property
    def address(self) -> str:
        return self.router.address

    async def stop(self) -> None:
        await self.router.stop()


async def serve_forever(config: ClusterConfig, worker_host: str) -> None:
    cluster = await ServingCluster.start(config, worker_host)
    info = cluster.backend.model_info()
    print(f"pdserve: serving {info.model_name} on {cluster.address} "
          f"({len(cluster.backend.pools.prefill)} prefill + {len(cluster.backend.pools.decode)} "
          "decode instances)", flush=True)
    try:
        await cluster.router.wait_for_termination()
    finally:
        await cluster.stop()
