"""The decode end of its pair channels: one `RecvLink` per (prefill instance, prefill rank) this
rank receives KV shards from (the transfer plan of the two layouts: kv_transfer/planner.py),
grouped per prefill instance in a `PrefillLinks`.

Descriptors arrive over the control plane (possibly out of order); the link's thread receives
transfers strictly in pair_seq order, each into the blocks reserved for its request, and reports
every outcome through `on_landed`. A failure breaks the channel: every later descriptor of this
generation fails at once, and the prefill side rebuilds the pair under a new generation.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from kv_transfer import (
    ChannelConfig,
    ChannelState,
    KVLayoutSpec,
    KVReceiver,
    KVTransferError,
    PairChannel,
    PairRole,
    failure_result,
    pair_key,
)
from kv_transfer.descriptors import shard_descriptor
from kv_transfer.planner import ParallelLayout, ShardMessage, plan_transfer, receives_of
from kv_transfer.rendezvous import rank_pair_key
from kv_transfer.shards import collect_links
from kv_transfer.errors import KVTransferConnectionError, KVTransferTimeoutError
from protos.pdserve.v1 import worker_pb2

LandedCallback = Callable[[str, worker_pb2.TransferResult], None]
BlocksLookup = Callable[[str], list[int] | None]


class RecvLink:
    """One generation of the channel from one prefill instance into this decode instance."""

    def __init__(self, store, prefill_id: str, decode_id: str, generation: int, device: str,
                 spec: KVLayoutSpec, kv_cache: torch.Tensor, blocks_of: BlocksLookup,
                 on_landed: LandedCallback, transfer_timeout_s: float,
                 connect_timeout_s: float = 60.0, bind_host: str | None = None,
                 rank: int = 0, prefill_rank: int | None = None) -> None:
        prefill_rank = rank if prefill_rank is None else prefill_rank
        self.key = rank_pair_key(pair_key(prefill_id, decode_id, generation), prefill_rank, rank)
        cfg = ChannelConfig(self.key, PairRole.DECODE, decode_id, device, connect_timeout_s,
                            bind_host)
        self.channel = PairChannel.connect(store, cfg, spec)
        self.receiver = KVReceiver(self.channel)
        self._kv_cache = kv_cache
        self._blocks_of = blocks_of
        self._on_landed = on_landed
        self._timeout_s = transfer_timeout_s
        self._heap: list[tuple[int, bytes, tuple[int, int] | None]] = []  # seq, desc, heads
        self._cond = threading.Condition()
        self._closed = False
        self.num_inflight = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kv-recv-{self.key}")
        self._thread.start()

    def expect(self, desc: worker_pb2.TransferDescriptor,
               heads: tuple[int, int] | None = None) -> None:
        """Receive this transfer (its layers, and KV `heads`: None = all of this rank's) in its
        turn; on a closed link it fails at once."""
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, (desc.pair_seq, desc.SerializeToString(), heads))
                self.num_inflight += 1
                self._cond.notify()
                return
        self._on_landed(desc.request_id, self._closed_result(desc))

    def close(self) -> None:
        """Stop receiving (a new generation replaces this one, or the worker stops): what is
        still expected fails, so that its reservation is freed and its request can move."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.channel.close()

    def _closed_result(self, desc: worker_pb2.TransferDescriptor) -> worker_pb2.TransferResult:
        return failure_result(desc, KVTransferConnectionError(f"pair {self.key} closed"))

    def _next(self) -> tuple[worker_pb2.TransferDescriptor, tuple[int, int] | None] | None:
        """The descriptor (and heads) with the next pair_seq; waits for it up to the transfer
        timeout."""
        want = self.receiver.next_seq
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            while not self._closed:
                if self._heap and self._heap[0][0] <= want:
                    return _popped(self._heap)
                if self._heap and time.monotonic() > deadline:  # a gap that never fills
                    self.channel.abort(f"descriptor {want} never arrived")
                    return _popped(self._heap)
                self._cond.wait(timeout=0.5 if self._heap else None)
        return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            desc, heads = item
            result = self._receive(desc, heads)
            with self._cond:
                self.num_inflight -= 1
            self._on_landed(desc.request_id, result)
        with self._cond:  # closed: nothing is pushed any more (see expect)
            left = [worker_pb2.TransferDescriptor.FromString(d) for _, d, _ in self._heap]
            self._heap.clear()
            self.num_inflight = 0
        for desc in left:
            self._on_landed(desc.request_id, self._closed_result(desc))

    def _receive(self, desc: worker_pb2.TransferDescriptor,
                 heads: tuple[int, int] | None) -> worker_pb2.TransferResult:
        started = time.monotonic()
        blocks = self._blocks_of(desc.request_id)
        try:
            if self.channel.state is not ChannelState.READY:
                raise KVTransferConnectionError(f"pair {self.key} is {self.channel.state.value}")
            if blocks is None:
                self.channel.abort(f"no reservation for request {desc.request_id!r}")
                raise KVTransferConnectionError(f"no blocks reserved for {desc.request_id!r}")
            return self.receiver.receive(desc, self._kv_cache, blocks, self._timeout_s, heads)
        except (KVTransferError, ValueError) as exc:
            err = exc if isinstance(exc, KVTransferError) else KVTransferConnectionError(str(exc))
            if self.channel.state is ChannelState.READY:
                self.channel.abort(str(err))
            return failure_result(desc, err, time.monotonic() - started)


def _popped(heap: list) -> tuple[worker_pb2.TransferDescriptor, tuple[int, int] | None]:
    _, desc, heads = heapq.heappop(heap)
    return worker_pb2.TransferDescriptor.FromString(desc), heads


class PrefillLinks:
    """This decode rank's links from one prefill instance: one RecvLink per prefill rank the
    plan receives a shard from."""

    def __init__(self, rank: int, plan: tuple[ShardMessage, ...],
                 links: dict[int, RecvLink]) -> None:
        self.rank = rank
        self.plan = plan
        self.messages = receives_of(plan, rank)
        self.links = links  # prefill rank -> link

    @property
    def key(self) -> str:
        """The instance pair's key (prefill rank 0 -> rank 0's channel), which descriptors name;
        empty on a rank that has no link from prefill rank 0."""
        return self.links[0].key if 0 in self.links else ""

    @property
    def num_inflight(self) -> int:
        return sum(link.num_inflight for link in self.links.values())

    @property
    def next_seq(self) -> int:
        """The pair_seq the links receive next (they advance together)."""
        return next(iter(self.links.values())).receiver.next_seq if self.links else 0

    def expected_outcomes(self) -> dict[int, int]:
        """Shard outcomes to await per decode rank for one transfer (kv_transfer/shards.py)."""
        return dict(Counter(message.decode_rank for message in self.plan))

    def expect(self, desc: worker_pb2.TransferDescriptor) -> None:
        """Receive this rank's shards of transfer `desc`, each on its own link in its turn."""
        for message in self.messages:
            link = self.links[message.prefill_rank]
            shard = shard_descriptor(desc, link.key, message.shard)
            link.expect(shard.desc, shard.heads)

    def close(self) -> None:
        for link in self.links.values():
            link.close()


LinkFactory = Callable[[int], RecvLink]  # prefill rank -> this rank's link from it


def accept_prefill(rank: int, new_link: LinkFactory, local_layout: str, model,
                   prefill_layout: str | None = None,
                   accept_other_ranks: Callable[[str], None] | None = None) -> PrefillLinks:
    """This rank's links from one prefill instance, every channel built concurrently. Without
    `prefill_layout` (rank 0), the link from prefill rank 0 goes first and its handshake names
    the prefill layout, which `accept_other_ranks` gets while this rank builds the rest."""
    links: dict[int, RecvLink] = {}
    try:
        if prefill_layout is None:
            links[0] = new_link(0)
            prefill_layout = links[0].channel.remote.parallel_layout
        plan = plan_transfer(ParallelLayout.parse(prefill_layout),
                             ParallelLayout.parse(local_layout), model)
        wanted = [m.prefill_rank for m in receives_of(plan, rank) if m.prefill_rank not in links]
        with ThreadPoolExecutor(max(1, len(wanted) + 1)) as pool:
            others = (pool.submit(accept_other_ranks, prefill_layout)
                      if accept_other_ranks is not None else None)
            links.update(collect_links({r: pool.submit(new_link, r) for r in wanted}, others))
    except BaseException:
        for link in links.values():
            link.close()
        raise
    return PrefillLinks(rank, plan, links)


__all__ = ["PrefillLinks", "RecvLink", "KVTransferTimeoutError", "accept_prefill"]
