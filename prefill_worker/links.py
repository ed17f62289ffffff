"""The prefill end of its pair channels: one `SendLink` per decode instance.

A link owns the pair's KVSender and a finisher thread. Transfers are begun on the engine thread
(in pair_seq order, before the step that writes their KV); the finisher waits for each one's
acknowledgement off the engine thread and reports the outcome through `on_done`, which is where
the request's prefill blocks are released — never earlier.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

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
from kv_transfer.rendezvous import rank_pair_key
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
    rank: int = 0  # of a multi-rank instance: this link joins rank `rank` of the decode side


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
                                          endpoint.generation), config.rank)
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
