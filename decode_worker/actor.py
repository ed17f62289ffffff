"""The Ray actor around a `DecodeWorker`: one per decode instance.

Its outputs leave through one long-lived streaming generator, `stream_outputs`, that the router
consumes: one Ray object per engine step (all of that step's tokens), not one per token.
The actor serves its worker's Prometheus metrics on a port of its own and reports the address
in `info()` (cluster.serve lists it in the Prometheus file_sd file).

`health()` answers on the event loop itself (no thread hop, no engine-thread round trip), so the
supervisor gets an answer even while the engine thread is wedged. `inject_step_failure()` and
`inject_step_hang(seconds)` are test hooks for the supervisor's death and watchdog tests.
"""

from __future__ import annotations

import asyncio

from cluster.worker_spec import (WorkerSpec, apply_process_settings, build_engine,
                                 serve_worker_metrics)
from decode_worker.worker import DecodeWorker
from engine.engine_loop import ActorLoopControls
from protos.pdserve.v1 import worker_pb2


class DecodeActor(ActorLoopControls):
    def __init__(self, spec: WorkerSpec) -> None:
        apply_process_settings(spec)
        from decode_worker.rank_links import DecodeRankService

        self.spec = spec
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue | None = None
        self.worker = DecodeWorker(build_engine(spec, DecodeRankService), spec.instance_id, self._emit,
                                   spec.host, spec.transfer_timeout_s,
                                   max_waiting_requests=spec.max_waiting_requests or None)
        self.metrics_endpoint = serve_worker_metrics(spec, self.worker.metrics.registry)
        if spec.fail_after_steps:  # fault injection by config (supervision.inject_engine_*)
            self.worker.loop.inject_step_failure(after_steps=spec.fail_after_steps)

    def _emit(self, outputs: worker_pb2.DecodeOutputs) -> None:
        """Engine thread -> event loop: one hop per step."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, outputs)

    async def info(self) -> dict[str, object]:
        self._loop = asyncio.get_running_loop()
        self._outputs = self._outputs or asyncio.Queue()
        cfg = self.worker.engine.model_config
        return {"instance_id": self.spec.instance_id, "model_name": cfg.name,
                "num_blocks": self.worker.engine.stats().num_blocks,
                "metrics_address": self.metrics_endpoint.address}

    async def stream_outputs(self):
        """Every DecodeOutputs this instance produces, until the actor dies."""
        while True:
            yield await self._outputs.get()

    async def endpoint(self, prefill_id: str, generation: int) -> worker_pb2.PairEndpoint:
        return self.worker.endpoint(prefill_id, generation)

    async def accept(self, prefill_id: str, generation: int) -> None:
        await asyncio.to_thread(self.worker.accept, prefill_id, generation,
                                self.spec.transport_device)

    async def reserve(self, request: worker_pb2.ReserveRequest) -> worker_pb2.ReserveReply:
        return await asyncio.to_thread(self.worker.reserve, request)

    async def expect_transfer(self, prefill_id: str, desc: worker_pb2.TransferDescriptor) -> None:
        self.worker.expect_transfer(prefill_id, desc)

    async def first_token(self, delta: worker_pb2.TokenDelta) -> None:
        self.worker.first_token(delta)

    async def abort(self, task: worker_pb2.AbortTask) -> worker_pb2.AbortReply:
        return await asyncio.to_thread(self.worker.abort, task)

    async def stats(self) -> worker_pb2.WorkerStats:
        return await asyncio.to_thread(self.worker.stats)


    async def kv_digests(self, block_ids: list[int]) -> list[str]:
        """sha256 of these blocks' KV on each rank, rank 0 first (diagnostics and tests)."""
        from kv_transfer.shards import instance_kv_digests

        return await asyncio.to_thread(instance_kv_digests, self.worker.engine, block_ids)

    async def kv_blocks(self, block_ids: list[int]) -> list[dict]:
        """These blocks' KV on each rank as JSON (kv_transfer.shards.kv_blocks_hex), rank 0
        first: how tests compare re-sharded KV (tiny models only)."""
        from kv_transfer.shards import instance_kv_blocks_hex

        return await asyncio.to_thread(instance_kv_blocks_hex, self.worker.engine, block_ids)

    async def rank_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 of a multi-rank instance (tests kill them)."""
        executor = self.worker.engine.executor
        return await asyncio.to_thread(lambda: list(getattr(executor, "rank_pids", [])))

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.worker.stop)
        self.metrics_endpoint.stop()
