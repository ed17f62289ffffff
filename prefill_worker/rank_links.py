"""The send links of ranks 1..N-1 of a multi-rank prefill instance (a rank service).

Rank 0's `PrefillWorker` drives them over the plan sockets (engine/executor/rank_calls.py):
- `connect` (any thread): build this rank's SendLink to the same rank of a decode instance;
- `begin` (inline, just before the plan that computes the prompts): begin this rank's shard of
  each transfer (`kv_transfer.shards`); the plan's layer listener posts each layer's KV;
- after the plan, every begun shard is handed to its link's finisher; each shard's outcome
  goes back to rank 0 as a `shard_done` event, and rank 0 frees the request's blocks once every
  rank has reported.
"""

from __future__ import annotations

import logging

from engine.executor.rank_calls import RankContext
from kv_transfer import FaultInjection, KVLayoutSpec, KVTransferConnectionError, failure_result
from kv_transfer.descriptors import shard_descriptor
from kv_transfer.shards import SHARD_DONE, kv_digest, shard_event
from prefill_worker.links import LinkConfig, SendLink, layer_sender
from protos.pdserve.v1 import worker_pb2

log = logging.getLogger(__name__)


class PrefillRankService:
    """This rank's SendLinks, one per decode instance."""

    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx
        self.spec = KVLayoutSpec.for_cache(ctx.kv_cache, ctx.model_name, ctx.layout, ctx.rank)
        self._links: dict[str, SendLink] = {}
        self._begun: list[tuple[SendLink, object]] = []  # (link, OutgoingTransfer) of the plan

    def call(self, name: str, args: tuple):
        return getattr(self, f"_{name}")(*args)

    def _kv_digest(self, block_ids: list[int]) -> str:
        """Diagnostics: a hash of this rank's KV in these blocks (kv_transfer.shards)."""
        return kv_digest(self._ctx.kv_cache, block_ids)

    def _connect(self, prefill_id: str, decode_id: str, endpoint: bytes, device: str,
                 transfer_timeout_s: float, bind_host: str | None, faults: dict) -> str:
        cfg = LinkConfig(prefill_id, decode_id, device, transfer_timeout_s,
                         faults=FaultInjection(**faults), bind_host=bind_host,
                         rank=self._ctx.rank)
        link = SendLink(cfg, worker_pb2.PairEndpoint.FromString(endpoint), self.spec,
                        self._shard_done)
        old, self._links[decode_id] = self._links.get(decode_id), link
        if old is not None:
            old.close()
        return link.key

    def _close(self, decode_id: str) -> None:
        if (link := self._links.pop(decode_id, None)) is not None:
            link.close()

    def _begin(self, orders: list[tuple[str, bytes, list[int]]]) -> None:
        """This step's transfers: (decode instance, the transfer's descriptor, block ids)."""
        kv_cache = self._ctx.kv_cache
        for decode_id, desc_bytes, block_ids in orders:
            desc = worker_pb2.TransferDescriptor.FromString(desc_bytes)
            link = self._links.get(decode_id)
            try:
                if link is None or not link.is_ready:
                    raise KVTransferConnectionError(
                        f"rank {self._ctx.rank} has no ready channel to {decode_id}")
                shard = shard_descriptor(desc, link.key, kv_cache.shape[0])
                self._begun.append((link, link.sender.begin(shard, kv_cache, block_ids)))
            except Exception as exc:  # noqa: BLE001 - reported; the decode side times out
                log.warning("rank %d cannot begin %s: %s", self._ctx.rank, desc.request_id, exc)
                error = exc if isinstance(exc, KVTransferConnectionError) else \
                    KVTransferConnectionError(str(exc))
                self._shard_done(desc.request_id, failure_result(desc, error))

    def layer_listener(self):
        return layer_sender({link.sender for link, _ in self._begun})

    def after_plan(self) -> None:
        begun, self._begun = self._begun, []
        for link, transfer in begun:
            if not link.hand_over(transfer):  # the link was replaced while the plan ran
                error = KVTransferConnectionError(f"pair {link.key} closed")
                self._shard_done(transfer.desc.request_id, failure_result(transfer.desc, error))

    def _shard_done(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        self._ctx.emit(SHARD_DONE, shard_event(request_id, result))

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
