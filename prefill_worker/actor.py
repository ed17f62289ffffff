"""The Ray actor around a `PrefillWorker`: one per prefill instance.

Every method is async so Ray serves them concurrently on the actor's event loop; blocking work
(channel construction, engine-thread round trips) runs in threads.
The actor serves its worker's Prometheus metrics on a port of its own and reports the address
in `info()` (cluster.serve lists it in the Prometheus file_sd file).

`health()` answers on the event loop itself (no thread hop, no engine-thread round trip), so the
supervisor gets an answer even while the engine thread is wedged. If the engine thread dies,
pending and later `prefill()` calls raise `EngineDeadError`. `inject_step_failure()` and
`inject_step_hang(seconds)` are test hooks for the supervisor's death and watchdog tests.
"""

from __future__ import annotations

import asyncio

from cluster.worker_spec import (WorkerSpec, apply_process_settings, build_engine,
                                 serve_worker_metrics)
from engine.engine_loop import ActorLoopControls
from prefill_worker.worker import DecodePeer, PrefillWorker
from protos.pdserve.v1 import worker_pb2


class PrefillActor(ActorLoopControls):
    def __init__(self, spec: WorkerSpec) -> None:
        apply_process_settings(spec)
        from prefill_worker.rank_links import PrefillRankService

        self.spec = spec
        self.worker = PrefillWorker(build_engine(spec, PrefillRankService), spec.instance_id,
                                    spec.layers_per_message, spec.transfer_timeout_s, spec.host,
                                    min_message_bytes=spec.min_message_bytes,
                                    faults=spec.faults)
        self.metrics_endpoint = serve_worker_metrics(spec, self.worker.metrics.registry)
        if spec.fail_after_steps:  # fault injection by config (supervision.inject_engine_*)
            self.worker.loop.inject_step_failure(after_steps=spec.fail_after_steps)

    async def info(self) -> dict[str, object]:
        """Startup check: the model is loaded; basic facts for the router."""
        cfg = self.worker.engine.model_config
        return {"instance_id": self.spec.instance_id, "model_name": cfg.name,
                "num_blocks": self.worker.engine.stats().num_blocks,
                "metrics_address": self.metrics_endpoint.address}

    async def connect(self, decode_id: str, endpoint: worker_pb2.PairEndpoint, decode_handle) -> None:
        peer = DecodePeer(
            expect_transfer=lambda d: decode_handle.expect_transfer.remote(self.spec.instance_id, d),
            first_token=lambda d: decode_handle.first_token.remote(d))
        await asyncio.to_thread(self.worker.connect, decode_id, endpoint, peer,
                                self.spec.transport_device)

    async def set_faults(self, faults, future_links: bool = False) -> None:
        self.worker.set_faults(faults, future_links)

    async def prefill(self, task: worker_pb2.PrefillTask) -> worker_pb2.PrefillResult:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self.worker.submit(task, lambda result: loop.call_soon_threadsafe(_settle, done, result),
                           lambda exc: loop.call_soon_threadsafe(_settle, done, None, exc))
        return await done

    async def abort(self, request_id: str) -> worker_pb2.AbortReply:
        return await asyncio.to_thread(self.worker.abort, request_id)

    async def stats(self) -> worker_pb2.WorkerStats:
        return await asyncio.to_thread(self.worker.stats)

    async def kv_snapshot(self) -> worker_pb2.KVEvents:
        """Every block hash its prefix cache holds now (the router's resync)."""
        return await asyncio.to_thread(self.worker.kv_snapshot)


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


def _settle(done: asyncio.Future, result: worker_pb2.PrefillResult | None,
            error: BaseException | None = None) -> None:
    if done.done():  # the caller went away (cancelled)
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
