"""The send links of ranks 1..N-1 of a multi-rank prefill instance (a rank service).

Rank 0's `PrefillWorker` drives them over the plan sockets (engine/executor/rank_calls.py):
- `connect` (any thread): build this rank's SendLinks to the decode ranks the transfer plan of
  the two layouts sends its shards to (kv_transfer/planner.py; the decode layout comes from rank
  0's handshake), possibly none;
- `begin` (inline, just before the plan that computes the prompts): begin this rank's shards of
  each transfer (`kv_transfer.shards`); the plan's layer listener posts each layer's KV;
- after the plan, every begun shard is handed to its link's finisher; each shard's outcome
  goes back to rank 0 as a `shard_done` event, and rank 0 frees the request's blocks once every
  shard of the plan has reported.
"""

from __future__ import annotations

import logging

from engine.executor.rank_calls import RankContext
from kv_transfer import FaultInjection, KVLayoutSpec, KVTransferConnectionError, failure_result
from kv_transfer.planner import ModelShape
from kv_transfer.shards import SHARD_DONE, kv_blocks_hex, kv_digest, shard_event
from prefill_worker.links import DecodeLinks, LinkConfig, connect_decode, layer_sender
from protos.pdserve.v1 import worker_pb2

log = logging.getLogger(__name__)


class PrefillRankService:
    """This rank's links, one DecodeLinks per decode instance."""

    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx
        self._links: dict[str, DecodeLinks] = {}
        self._begun: list[tuple[DecodeLinks, list]] = []  # (links, their shards) of the plan

    def call(self, name: str, args: tuple):
        return getattr(self, f"_{name}")(*args)

    def _kv_digest(self, block_ids: list[int]) -> str:
        """Diagnostics: a hash of this rank's KV in these blocks (kv_transfer.shards)."""
        return kv_digest(self._ctx.kv_cache, block_ids)

    def _kv_blocks(self, block_ids: list[int]) -> dict:
        """Diagnostics: this rank's KV in these blocks (kv_transfer.shards, tiny models)."""
        return kv_blocks_hex(self._ctx.kv_cache, block_ids)

    def _connect(self, prefill_id: str, decode_id: str, endpoint: bytes, device: str,
                 transfer_timeout_s: float, bind_host: str | None, faults: dict,
                 layouts: tuple[str, str], model: tuple[int, int]) -> list[str]:
        """`layouts`: (this instance's, the decode instance's); `model`: (layers, KV heads)."""
        spec = KVLayoutSpec.for_cache(self._ctx.kv_cache, self._ctx.model_name, layouts[0],
                                      self._ctx.rank, ModelShape(*model))
        cfg = LinkConfig(prefill_id, decode_id, device, transfer_timeout_s,
                         faults=FaultInjection(**faults), bind_host=bind_host,
                         rank=self._ctx.rank)
        links = connect_decode(cfg, worker_pb2.PairEndpoint.FromString(endpoint), spec,
                               self._shard_done, decode_layout=layouts[1])
        old, self._links[decode_id] = self._links.get(decode_id), links
        if old is not None:
            old.close()
        return [link.key for link in links.links.values()]

    def _close(self, decode_id: str) -> None:
        if (link := self._links.pop(decode_id, None)) is not None:
            link.close()

    def _begin(self, orders: list[tuple[str, bytes, list[int], dict[int, int]]]) -> None:
        """This step's transfers: (decode instance, the transfer's descriptor, block ids, the
        shard outcomes rank 0 awaits from each rank)."""
        for decode_id, desc_bytes, block_ids, expected in orders:
            desc = worker_pb2.TransferDescriptor.FromString(desc_bytes)
            links = self._links.get(decode_id)
            num_shards = expected.get(self._ctx.rank, 0)
            if not num_shards:
                continue  # the plan reads nothing from this rank: no outcome is awaited
            try:
                if links is None or not links.is_ready:
                    raise KVTransferConnectionError(
                        f"rank {self._ctx.rank} has no ready channel to {decode_id}")
                self._begun.append((links, links.begin(desc, self._ctx.kv_cache, block_ids)))
            except Exception as exc:  # noqa: BLE001 - reported; the decode side times out
                log.warning("rank %d cannot begin %s: %s", self._ctx.rank, desc.request_id, exc)
                error = exc if isinstance(exc, KVTransferConnectionError) else \
                    KVTransferConnectionError(str(exc))
                for _ in range(num_shards):
                    self._shard_done(desc.request_id, failure_result(desc, error))

    def layer_listener(self):
        return layer_sender({sender for links, _ in self._begun for sender in links.senders})

    def after_plan(self) -> None:
        begun, self._begun = self._begun, []
        for links, shards in begun:
            if not links.hand_over(shards):  # the links were replaced while the plan ran
                for link, transfer in shards:
                    error = KVTransferConnectionError(f"pair {link.key} closed")
                    self._shard_done(transfer.desc.request_id,
                                     failure_result(transfer.desc, error))

    def _shard_done(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        self._ctx.emit(SHARD_DONE, shard_event(request_id, result))

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
