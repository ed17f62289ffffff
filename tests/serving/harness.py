"""Shared harness for serving tests: a router (any backend) on 127.0.0.1, or the whole
`ServingCluster` as `pdserve serve` starts it, driven from a background event loop, with the
leak check every scenario ends with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine

from cluster.serve import ServingCluster
from protos.pdserve.v1 import generation_pb2
from router.client import PdserveClient
from router.server import start_router


class ServerHarness:
    """Starts `backend` behind a real grpc.aio router and a real client."""

    cluster: ServingCluster | None = None  # set by for_cluster

    def __init__(self, backend, metrics_port: int | None = None) -> None:
        self._start_loop()
        self.backend = backend
        self.server = self.run(start_router(backend, "127.0.0.1", 0, metrics_port), timeout_s=120)
        self.client = self.run(_make_client(self.server.address))

    @classmethod
    def for_cluster(cls, config, timeout_s: float = 300.0) -> ServerHarness:
        """The whole system from `config`, started by the same `ServingCluster.start` as
        `pdserve serve` (pools, backend, router, /metrics endpoints, file_sd file)."""
        harness = cls.__new__(cls)
        harness._start_loop()
        try:
            harness.cluster = harness.run(ServingCluster.start(config), timeout_s=timeout_s)
        except BaseException:
            harness._stop_loop()
            raise
        harness.backend = harness.cluster.backend
        harness.server = harness.cluster.router
        harness.client = harness.run(_make_client(harness.server.address))
        return harness

    def _start_loop(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop",
                                        daemon=True)
        self._thread.start()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)

    @property
    def address(self) -> str:
        return self.server.address

    def run(self, coro: Coroutine, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self, stop_backend: bool = True) -> None:
        self.run(self.client.close())
        if stop_backend and self.cluster is not None:
            self.run(self.cluster.stop(grace_s=1.0), timeout_s=60)
        elif stop_backend:
            self.run(self.server.stop(grace_s=1.0), timeout_s=60)
        self._stop_loop()

    def wait_until_idle(self, timeout_s: float = 20.0):
        """Leak check: every live instance reports all KV blocks free and no request or
        transfer (a dead one's blocks died with its process)."""
        deadline = time.monotonic() + timeout_s
        while True:
            instances = [s for s in self.run(self.client.cluster_state()).instances
                         if s.status != generation_pb2.INSTANCE_STATUS_DEAD]
            busy = [s for s in instances if s.free_kv_blocks != s.total_kv_blocks
                    or s.num_running_requests or s.num_waiting_requests or s.num_inflight_transfers]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not busy, f"not idle after {timeout_s} s: {busy}"
        return instances


async def _make_client(address: str) -> PdserveClient:
    return PdserveClient(address)  # the aio channel must be created on the loop that uses it
