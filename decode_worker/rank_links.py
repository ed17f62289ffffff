"""The receive links of ranks 1..N-1 of a multi-rank decode instance (a rank service).

Rank 0's `DecodeWorker` drives them over the plan sockets (engine/executor/rank_calls.py):
- `accept` (any thread): build this rank's RecvLink from the same rank of a prefill instance,
  through rank 0's rendezvous store;
- `expect` (inline): receive this rank's shard of a transfer (`kv_transfer.shards`) into the
  request's blocks (the ids rank 0 reserved: one block id names the same block on every rank);
  each shard's outcome goes back to rank 0 as a `shard_done` event, and rank 0 admits the
  request once every rank's shard landed.
"""

from __future__ import annotations

import threading

from decode_worker.links import RecvLink
from engine.executor.rank_calls import RankContext
from kv_transfer import KVLayoutSpec, KVTransferConnectionError, failure_result, join_store
from kv_transfer.descriptors import shard_descriptor
from kv_transfer.shards import SHARD_DONE, kv_digest, shard_event
from protos.pdserve.v1 import worker_pb2


class DecodeRankService:
    """This rank's RecvLinks, one per prefill instance."""

    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx
        self.spec = KVLayoutSpec.for_cache(ctx.kv_cache, ctx.model_name, ctx.layout, ctx.rank)
        self._links: dict[str, RecvLink] = {}
        self._lock = threading.Lock()
        self._blocks: dict[str, list[int]] = {}  # request id -> its reserved blocks
        self._stores: dict[tuple[str, int], object] = {}

    def call(self, name: str, args: tuple):
        return getattr(self, f"_{name}")(*args)

    def _kv_digest(self, block_ids: list[int]) -> str:
        """Diagnostics: a hash of this rank's KV in these blocks (kv_transfer.shards)."""
        return kv_digest(self._ctx.kv_cache, block_ids)

    def _accept(self, prefill_id: str, decode_id: str, generation: int, store_host: str,
                store_port: int, device: str, transfer_timeout_s: float,
                bind_host: str | None) -> str:
        store = self._stores.get((store_host, store_port))
        if store is None:  # one client connection to rank 0's store, kept with the links
            store = join_store(store_host, store_port, 60.0)
            self._stores[(store_host, store_port)] = store
        link = RecvLink(store, prefill_id, decode_id, generation, device, self.spec,
                        self._ctx.kv_cache, self._blocks_of, self._landed, transfer_timeout_s,
                        bind_host=bind_host, rank=self._ctx.rank)
        with self._lock:
            old, self._links[prefill_id] = self._links.get(prefill_id), link
        if old is not None:
            old.close()
        return link.key

    def _expect(self, prefill_id: str, desc_bytes: bytes, block_ids: list[int]) -> None:
        desc = worker_pb2.TransferDescriptor.FromString(desc_bytes)
        with self._lock:
            link = self._links.get(prefill_id)
            self._blocks[desc.request_id] = list(block_ids)
        if link is None:
            error = KVTransferConnectionError(f"rank {self._ctx.rank} has no channel from "
                                              f"{prefill_id}")
            self._landed(desc.request_id, failure_result(desc, error))
            return
        link.expect(shard_descriptor(desc, link.key, self._ctx.kv_cache.shape[0]))

    def _blocks_of(self, request_id: str) -> list[int] | None:
        with self._lock:
            return self._blocks.get(request_id)

    def _landed(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        with self._lock:
            self._blocks.pop(request_id, None)
        self._ctx.emit(SHARD_DONE, shard_event(request_id, result))

    def layer_listener(self):
        return None

    def after_plan(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
