"""The prefill end of its pair channels: one `SendLink` per (decode instance, decode rank) this
rank sends KV shards to, grouped per decode instance in a `DecodeLinks`.

A link owns the pair's KVSender and a finisher thread. Transfers are begun on the engine thread
(in pair_seq order, before the step that writes their KV); the finisher waits for each one's
acknowledgement off the engine thread and reports the outcome through `on_done`, which is where
the request's prefill blocks are released — never earlier. Which decode ranks a prefill rank
sends to, and which shard (layers x KV heads) each, is the transfer plan of the two instances'
layouts (kv_transfer/planner.py); rank 0's link to decode rank 0 is built first, and its
handshake tells the decode instance's layout.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from kv_transfer import (
    ChannelConfig,
    ChannelState,
    FaultInjection,
    KVLayoutSpec,
    KVSender,
    KVTransferError,
    OutgoingTransfer,
    PairChannel,
    PairRole,
    failure_result,
    join_store,
    pair_key,
)
from kv_transfer.descriptors import shard_descriptor
from kv_transfer.planner import ParallelLayout, ShardMessage, plan_transfer, sends_of
from kv_transfer.rendezvous import rank_pair_key
from kv_transfer.shards import collect_links
from protos.pdserve.v1 import worker_pb2

DoneCallback = Callable[[str, worker_pb2.TransferResult], None]


@dataclass(slots=True)
class LinkConfig:
    prefill_id: str
    decode_id: str
    device: str  # "cpu" -> Gloo; "cuda" -> NCCL
    transfer_timeout_s: float = 30.0
    connect_timeout_s: float = 60.0
    faults: FaultInjection = FaultInjection()
    bind_host: str | None = None  # address this end's Gloo listens on
    rank: int = 0  # this end's rank in the prefill instance
    decode_rank: int | None = None  # the decode rank it sends to; None: the same as `rank`


def layer_sender(senders) -> Callable[[int], None] | None:
    """The layer listener that posts layer `i` of every transfer of `senders` (KVSenders)
    as soon as the forward pass has written it; None when there is nothing to send."""
    if not senders:
        return None

    def on_layer_done(layer: int) -> None:
        for sender in senders:
            sender.send_layers(layer, layer + 1)
    return on_layer_done


class SendLink:
    """One generation of the channel from this prefill instance to one decode instance."""

    def __init__(self, config: LinkConfig, endpoint: worker_pb2.PairEndpoint,
                 spec: KVLayoutSpec, on_done: DoneCallback) -> None:
        self.config = config
        self.generation = endpoint.generation
        self.key = rank_pair_key(pair_key(config.prefill_id, config.decode_id,
                                          endpoint.generation), config.rank, config.decode_rank)
        store = join_store(endpoint.store_host, endpoint.store_port, config.connect_timeout_s)
        channel_cfg = ChannelConfig(self.key, PairRole.PREFILL, config.prefill_id, config.device,
                                    config.connect_timeout_s, config.bind_host)
        self.channel = PairChannel.connect(store, channel_cfg, spec)
        self._store = store  # keep the client connection alive with the channel
        self.sender = KVSender(self.channel, config.faults)
        self._on_done = on_done
        self._queue: queue.Queue[OutgoingTransfer | None] = queue.Queue()
        self._lock = threading.Lock()  # orders hand_over against close
        self._closed = False
        self.num_inflight = 0
        self._thread = threading.Thread(target=self._finish_loop, daemon=True,
                                        name=f"kv-finish-{self.key}")
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self.channel.state is ChannelState.READY

    def hand_over(self, transfer: OutgoingTransfer) -> bool:
        """All of `transfer`'s layers are posted (or will be): wait for its ack off-thread.
        False if the link was closed meanwhile (replaced by a new generation while the step
        that began the transfer ran): the transfer cannot complete, and the caller still owns
        its blocks."""
        with self._lock:
            if self._closed:
                return False
            self.num_inflight += 1
            self._queue.put(transfer)
            return True

    def close(self) -> None:
        """Fail what is still in flight (the finisher drains the queue first) and stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self.channel.close()

    def _finish_loop(self) -> None:
        while (transfer := self._queue.get()) is not None:
            try:
                result = self.sender.finish(transfer, self.config.transfer_timeout_s)
            except KVTransferError as exc:
                result = failure_result(transfer.desc, exc)
            except ValueError as exc:  # finished on a broken channel: report, don't die
                result = failure_result(transfer.desc, KVTransferError(str(exc)))
            with self._lock:
                self.num_inflight -= 1
            self._on_done(transfer.desc.request_id, result)


ShardBegun = list[tuple[SendLink, OutgoingTransfer]]  # one transfer's shards on this rank


class DecodeLinks:
    """This prefill rank's links to one decode instance: one SendLink per decode rank the plan
    sends a shard to (none when this rank sends nothing). Every link carries a shard of every
    transfer, so their pair_seq advance together."""

    def __init__(self, rank: int, plan: tuple[ShardMessage, ...],
                 links: dict[int, SendLink], on_done: DoneCallback) -> None:
        self.rank = rank
        self.plan = plan
        self.messages = sends_of(plan, rank)
        self.links = links  # decode rank -> link
        self._on_done = on_done

    @property
    def key(self) -> str:
        """The instance pair's key (rank 0 -> decode rank 0's channel): transfer descriptors
        name it."""
        return self.links[0].key if 0 in self.links else ""

    @property
    def is_ready(self) -> bool:
        return all(link.is_ready for link in self.links.values())

    @property
    def next_seq(self) -> int:
        return next(iter(self.links.values())).sender.next_seq if self.links else 0

    @property
    def senders(self) -> list:
        return [link.sender for link in self.links.values()]

    @property
    def num_inflight(self) -> int:
        return sum(link.num_inflight for link in self.links.values())

    def expected_outcomes(self) -> dict[int, int]:
        """Shard outcomes to await per prefill rank for one transfer (kv_transfer/shards.py)."""
        return dict(Counter(message.prefill_rank for message in self.plan))

    def min_shard_heads(self) -> int:
        """The fewest KV heads any message of the plan carries (sizes the messages)."""
        return min(message.shard.num_heads for message in self.plan)

    def begin(self, desc: worker_pb2.TransferDescriptor, kv_cache,
              block_ids: list[int]) -> ShardBegun:
        """Begin this rank's shard of transfer `desc` on each of its links; on a failure the
        shards already begun are abandoned (their channels aborted) and the error raised."""
        begun: ShardBegun = []
        try:
            for message in self.messages:
                link = self.links[message.decode_rank]
                shard = shard_descriptor(desc, link.key, message.shard)
                begun.append((link, link.sender.begin(shard.desc, kv_cache, block_ids,
                                                      shard.heads)))
        except Exception:
            for link, _ in begun:
                link.sender.abort(f"transfer {desc.request_id}: another shard failed to begin")
            raise
        return begun

    def hand_over(self, begun: ShardBegun) -> bool:
        """Every shard's ack is awaited off-thread. False when no link took its shard (all
        replaced meanwhile): the caller still owns the blocks and no outcome will come; a shard
        some link refused alone is reported failed through `on_done`."""
        refused = [(link, t) for link, t in begun if not link.hand_over(t)]
        if len(refused) == len(begun):
            return False
        for link, transfer in refused:
            error = KVTransferError(f"pair {link.key} closed")
            self._on_done(transfer.desc.request_id, failure_result(transfer.desc, error))
        return True

    def set_faults(self, faults: FaultInjection) -> None:
        for link in self.links.values():
            link.sender._faults = faults

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def connect_decode(config: LinkConfig, endpoint: worker_pb2.PairEndpoint, spec: KVLayoutSpec,
                   on_done: DoneCallback, decode_layout: str | None = None,
                   connect_other_ranks: Callable[[str], None] | None = None) -> DecodeLinks:
    """This rank's links to one decode instance, every channel built concurrently (the peers
    build theirs in any order). Without `decode_layout` (rank 0), the link to decode rank 0
    goes first and its handshake names the decode layout, which `connect_other_ranks` (the
    instance's other ranks) gets while this rank builds the rest."""
    links: dict[int, SendLink] = {}
    try:
        if decode_layout is None:
            links[0] = SendLink(replace(config, decode_rank=0), endpoint, spec, on_done)
            decode_layout = links[0].channel.remote.parallel_layout
        plan = plan_transfer(spec.layout, ParallelLayout.parse(decode_layout), spec.model)
        wanted = [m.decode_rank for m in sends_of(plan, config.rank) if m.decode_rank not in links]
        with ThreadPoolExecutor(max(1, len(wanted) + 1)) as pool:
            others = (pool.submit(connect_other_ranks, decode_layout)
                      if connect_other_ranks is not None else None)
            built = {rank: pool.submit(SendLink, replace(config, decode_rank=rank), endpoint,
                                       spec, on_done) for rank in wanted}
            links.update(collect_links(built, others))
    except BaseException:
        for link in links.values():
            link.close()
        raise
    return DecodeLinks(config.rank, plan, links, on_done)

