"""The receive links of ranks 1..N-1 of a multi-rank decode instance (a rank service).

Rank 0's `DecodeWorker` drives them over the plan sockets (engine/executor/rank_calls.py):
- `accept` (any thread): build this rank's RecvLinks from the prefill ranks the transfer plan
  of the two layouts reads its shards from (kv_transfer/planner.py; the prefill layout comes
  from rank 0's handshake), through rank 0's rendezvous store;
- `expect` (inline): receive this rank's shards of a transfer (`kv_transfer.shards`) into the
  request's blocks (the ids rank 0 reserved: one block id names the same block on every rank);
  each shard's outcome goes back to rank 0 as a `shard_done` event, and rank 0 admits the
  request once every shard of the plan landed.
"""

from __future__ import annotations

import threading

from decode_worker.links import PrefillLinks, RecvLink, accept_prefill
from engine.executor.rank_calls import RankContext
from kv_transfer import KVLayoutSpec, KVTransferConnectionError, failure_result, join_store
from kv_transfer.planner import ModelShape
from kv_transfer.shards import SHARD_DONE, kv_blocks_hex, kv_digest, shard_event
from protos.pdserve.v1 import worker_pb2


class DecodeRankService:
    """This rank's links, one PrefillLinks per prefill instance."""

    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx
        self._links: dict[str, PrefillLinks] = {}
        self._lock = threading.Lock()
        # request id -> its reserved blocks, and how many of its shards are still to land here
        self._blocks: dict[str, tuple[list[int], int]] = {}
        self._stores: dict[tuple[str, int], object] = {}

    def call(self, name: str, args: tuple):
        return getattr(self, f"_{name}")(*args)

    def _kv_digest(self, block_ids: list[int]) -> str:
        """Diagnostics: a hash of this rank's KV in these blocks (kv_transfer.shards)."""
        return kv_digest(self._ctx.kv_cache, block_ids)

    def _kv_blocks(self, block_ids: list[int]) -> dict:
        """Diagnostics: this rank's KV in these blocks (kv_transfer.shards, tiny models)."""
        return kv_blocks_hex(self._ctx.kv_cache, block_ids)

    def _accept(self, prefill_id: str, decode_id: str, generation: int, store_host: str,
                store_port: int, device: str, transfer_timeout_s: float,
                bind_host: str | None, layouts: tuple[str, str],
                model: tuple[int, int]) -> list[str]:
        """`layouts`: (this instance's, the prefill instance's); `model`: (layers, KV heads)."""
        store = self._stores.get((store_host, store_port))
        if store is None:  # one client connection to rank 0's store, kept with the links
            store = join_store(store_host, store_port, 60.0)
            self._stores[(store_host, store_port)] = store
        shape = ModelShape(*model)
        spec = KVLayoutSpec.for_cache(self._ctx.kv_cache, self._ctx.model_name, layouts[0],
                                      self._ctx.rank, shape)

        def new_link(prefill_rank: int) -> RecvLink:
            return RecvLink(store, prefill_id, decode_id, generation, device, spec,
                            self._ctx.kv_cache, self._blocks_of, self._landed,
                            transfer_timeout_s, bind_host=bind_host, rank=self._ctx.rank,
                            prefill_rank=prefill_rank)
        links = accept_prefill(self._ctx.rank, new_link, layouts[0], shape,
                               prefill_layout=layouts[1])
        with self._lock:
            old, self._links[prefill_id] = self._links.get(prefill_id), links
        if old is not None:
            old.close()
        return [link.key for link in links.links.values()]

    def _expect(self, prefill_id: str, desc_bytes: bytes, block_ids: list[int],
                expected: dict[int, int]) -> None:
        """Receive this rank's shards of a transfer (`expected`: the shard outcomes rank 0
        awaits from each rank)."""
        desc = worker_pb2.TransferDescriptor.FromString(desc_bytes)
        with self._lock:
            links = self._links.get(prefill_id)
            if links is not None:
                self._blocks[desc.request_id] = (list(block_ids), len(links.messages))
        if links is None:  # rank 0 awaits expected[rank] outcomes from this rank
            error = KVTransferConnectionError(f"rank {self._ctx.rank} has no channel from "
                                              f"{prefill_id}")
            for _ in range(expected.get(self._ctx.rank, 0)):
                self._ctx.emit(SHARD_DONE, shard_event(desc.request_id,
                                                       failure_result(desc, error)))
            return
        links.expect(desc)

    def _blocks_of(self, request_id: str) -> list[int] | None:
        with self._lock:
            entry = self._blocks.get(request_id)
        return None if entry is None else entry[0]

    def _landed(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        with self._lock:
            if (entry := self._blocks.get(request_id)) is not None:
                if entry[1] <= 1:
                    del self._blocks[request_id]
                else:
                    self._blocks[request_id] = (entry[0], entry[1] - 1)
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
