"""KVSender: the prefill end of a pair, streaming each request's KV as its layers are written.

Per transfer (SendState):
    begin(desc)         -> STREAMING: header posted (or queued behind earlier transfers)
    send_layers(l0, l1) -> layer groups whose layers are all written are packed and posted
    (last group posted) -> SENT: the ack receive is posted
    finish(timeout_s)   -> DONE once the decode side acknowledged, FAILED otherwise
Transfers on a pair go on the wire strictly in pair_seq order, message by message (wire.py):
a later transfer's messages wait until every message of the earlier one is posted. Sends are
asynchronous; only finish() blocks, and never beyond its timeout. Any failure aborts the channel,
which fails every other open transfer on it too.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.channel import ChannelState, PairChannel, PendingOp
from kv_transfer.descriptors import (
    block_ids_tensor,
    layer_groups,
    transfer_result,
    validate_descriptor,
)
from kv_transfer.errors import KVTransferConnectionError, KVTransferProtocolError
from kv_transfer.faults import NO_FAULTS, FaultInjection
from kv_transfer.packing import pack_blocks
from kv_transfer.streams import TransferStream
from kv_transfer.wire import ack_mismatches, empty_ack, encode_header
from protos.pdserve.v1 import worker_pb2


class SendState(enum.Enum):
    STREAMING = "streaming"  # begun; some layers are not yet written or posted
    SENT = "sent"  # every message posted; finish() waits for the ack
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class OutgoingTransfer:
    """One request's KV on its way to the decode instance (returned by KVSender.begin)."""

    desc: worker_pb2.TransferDescriptor
    kv_cache: torch.Tensor
    block_ids: torch.Tensor
    groups: list[tuple[int, int]]  # layer range of each KV message (model coordinates)
    started_at: float  # time.monotonic() at begin()
    ready_until: int  # layers [desc.layer_start, ready_until) are written
    heads: tuple[int, int] = (0, 0)  # the shard's KV heads (model coordinates)
    cache_heads: slice = field(default_factory=lambda: slice(None))  # those heads in the cache
    state: SendState = SendState.STREAMING
    sent_at: float = 0.0  # time.monotonic() when the last message was posted
    next_group: int = 0  # first group not yet posted (or dropped)
    header_posted: bool = False
    num_layers_posted: int = 0
    num_bytes: int = 0
    ops: list[PendingOp] = field(default_factory=list)
    ack: torch.Tensor | None = None
    ack_op: PendingOp | None = None
    error: KVTransferConnectionError | None = None  # why posting failed (state FAILED)


class KVSender:
    """Streams KV over one PairChannel (prefill side); pair_seq counts from 0 per channel."""

    def __init__(self, channel: PairChannel, faults: FaultInjection = NO_FAULTS) -> None:
        self._channel = channel
        self._faults = faults
        self._lock = threading.Lock()
        self._open: list[OutgoingTransfer] = []  # begun, not finished; in pair_seq order
        self._next_seq = 0
        self._stream: TransferStream | None = None
        self._silent = False  # a fault dropped a message: nothing more goes out (a dead link)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def begin(
        self, desc: worker_pb2.TransferDescriptor, kv_cache: torch.Tensor,
        block_ids: Sequence[int], heads: tuple[int, int] | None = None,
    ) -> OutgoingTransfer:
        """Open the transfer `desc` of blocks `block_ids` (its layers, and KV `heads`: None =
        every head of this rank, in model coordinates); its KV is sent by send_layers()."""
        self._require_ready()
        held = self._channel.spec.shard
        heads = heads or held.heads
        validate_descriptor(desc, self._channel.spec, self._channel.pair_key, heads)
        self._channel.spec.check_cache(kv_cache)
        ids = block_ids_tensor(block_ids, desc, kv_cache)
        with self._lock:
            if desc.pair_seq != self._next_seq:
                raise ValueError(f"pair {self._channel.pair_key}: transfer pair_seq "
                                 f"{desc.pair_seq} is out of order; expected {self._next_seq}")
            self._use_stream_for(kv_cache.device)
            cache_heads = slice(heads[0] - held.heads[0], heads[1] - held.heads[0])
            transfer = OutgoingTransfer(desc, kv_cache, ids, layer_groups(desc), time.monotonic(),
                                        ready_until=desc.layer_start, heads=heads,
                                        cache_heads=cache_heads)
            self._next_seq += 1
            self._open.append(transfer)
            self._pump()
        return transfer

    def send_layers(self, layer_start: int, layer_end: int) -> None:
        """Layers [layer_start, layer_end) of this rank's cache (stage-local, as the forward
        pass reports them) are written for every open transfer: send them."""
        if not 0 <= layer_start < layer_end:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is empty or negative")
        offset = self._channel.spec.shard.layers[0]  # stage-local -> model coordinates
        layer_start, layer_end = layer_start + offset, layer_end + offset
        with self._lock:
            streaming = [t for t in self._open if t.state is SendState.STREAMING]
            for transfer in streaming:
                _check_in_order(transfer, layer_start, layer_end)
            for transfer in streaming:
                transfer.ready_until = max(transfer.ready_until,
                                           min(layer_end, transfer.desc.layer_end))
            if not any(_group_ready(t) for t in streaming):
                return  # inside a layer group: nothing to pack yet, no event, no pump
            if self._stream is not None:
                self._stream.wait_for_compute()
            self._pump()

    def finish(
        self, transfer: OutgoingTransfer, timeout_s: float
    ) -> worker_pb2.TransferResult:
        """Wait until the decode side holds the KV; raise a KVTransferError within timeout_s.

        The result's duration_s counts from begin(), its tail_s from the last message posted.
        """
        if transfer.error is not None:
            raise transfer.error  # posting failed during the step; reported here, off it
        self._require_finishable(transfer)
        deadline = time.monotonic() + timeout_s
        try:
            self._await_ack(transfer, deadline)
            for op in transfer.ops:
                self._channel.wait(op, _remaining(deadline))
        except Exception:
            self._close_transfer(transfer, SendState.FAILED)
            raise
        self._close_transfer(transfer, SendState.DONE)
        now = time.monotonic()
        return transfer_result(transfer.desc, worker_pb2.TRANSFER_STATUS_OK,
                               num_bytes=transfer.num_bytes,
                               duration_s=now - transfer.started_at, tail_s=now - transfer.sent_at)

    def abort(self, reason: str) -> None:
        """Abandon every open transfer and break the channel (the decode side fails fast)."""
        self._channel.abort(reason)
        with self._lock:
            for transfer in self._open:
                transfer.state = SendState.FAILED
            self._open.clear()

    def _pump(self) -> None:
        """Post whatever is ready, in wire order: transfer by transfer, group by group."""
        if self._stream is None:
            return  # nothing begun yet
        try:
            with self._stream.use():
                for transfer in self._open:
                    if transfer.state is SendState.STREAMING and not self._post_ready(transfer):
                        return  # later transfers wait until this one is fully posted
        except KVTransferConnectionError as exc:
            # The peer is gone. This runs inside the prefill's forward pass (send_layers): the
            # step must go on, so every open transfer fails, and finish() raises the error.
            for transfer in self._open:
                transfer.state, transfer.error = SendState.FAILED, exc
            self._open.clear()

    def _post_ready(self, transfer: OutgoingTransfer) -> bool:
        """Post the header and every ready group; True once the transfer is fully posted."""
        if not transfer.header_posted:
            if not self._silent:
                header = encode_header(transfer.desc, transfer.heads,
                                       corrupt=self._faults.corrupt_header)
                transfer.ops.append(self._channel.send(header.to(self._channel.device)))
            transfer.header_posted = True
        while transfer.next_group < len(transfer.groups):
            start, end = transfer.groups[transfer.next_group]
            if end > transfer.ready_until:
                return False
            self._post_group(transfer, start, end)
            transfer.next_group += 1
        # Only now: NCCL runs a pair's sends and receives in posting order on one stream, so an
        # ack receive posted earlier would hold back this transfer's own data.
        transfer.ack = empty_ack().to(self._channel.device)
        transfer.ack_op = self._channel.recv(transfer.ack)
        transfer.state = SendState.SENT
        transfer.sent_at = time.monotonic()
        return True

    def _post_group(self, transfer: OutgoingTransfer, start: int, end: int) -> None:
        if self._silent or self._faults.drops(transfer.num_layers_posted, end - start):
            # A link that drops a message stays silent: a later transfer's messages must not
            # fill the receive buffers the dropped ones left posted (Gloo would match them).
            self._silent = True
            return
        if self._faults.delay_s:
            time.sleep(self._faults.delay_s)
        offset = self._channel.spec.shard.layers[0]
        packed = pack_blocks(transfer.kv_cache, transfer.block_ids,
                             slice(start - offset, end - offset), heads=transfer.cache_heads)
        if packed.device != self._channel.device:
            packed = packed.to(self._channel.device)  # Gloo with a CUDA cache: via the host
        transfer.ops.append(self._channel.send(packed))
        transfer.num_layers_posted += end - start
        transfer.num_bytes += packed.numel() * packed.element_size()

    def _await_ack(self, transfer: OutgoingTransfer, deadline: float) -> None:
        assert transfer.ack_op is not None and transfer.ack is not None  # set when SENT
        self._channel.wait(transfer.ack_op, _remaining(deadline))
        ack = transfer.ack.cpu()
        problems = ack_mismatches(ack, transfer.desc)
        status, num_bytes = int(ack[2]), int(ack[3])
        if status != worker_pb2.TRANSFER_STATUS_OK:
            problems.append("decode side refused the transfer: "
                            f"{worker_pb2.TransferStatus.Name(status)}")
        elif num_bytes != transfer.num_bytes:
            problems.append(f"decode side got {num_bytes} bytes, {transfer.num_bytes} were sent")
        if problems:
            message = (f"pair {self._channel.pair_key} seq {transfer.desc.pair_seq}: "
                       + "; ".join(problems))
            self._channel.abort(message)
            raise KVTransferProtocolError(message)

    def _use_stream_for(self, device: torch.device) -> None:
        if self._stream is None:
            self._stream = TransferStream(device)
        elif self._stream.device != device:
            raise ValueError(f"this sender streams from a cache on {self._stream.device}, "
                             f"got one on {device}")

    def _require_ready(self) -> None:
        if self._channel.state is not ChannelState.READY:
            raise KVTransferConnectionError(
                f"pair {self._channel.pair_key} is {self._channel.state.value}; rebuild it "
                "under a new generation key")

    def _require_finishable(self, transfer: OutgoingTransfer) -> None:
        if transfer.state in (SendState.DONE, SendState.FAILED):
            raise ValueError(f"transfer seq {transfer.desc.pair_seq} already finished "
                             f"({transfer.state.value})")
        if transfer.state is SendState.STREAMING:
            self._require_ready()
            raise ValueError(
                f"finish() before send_layers() covered layers [{transfer.ready_until}, "
                f"{transfer.desc.layer_end}) of transfer seq {transfer.desc.pair_seq}; "
                "call abort() to give it up")

    def _close_transfer(self, transfer: OutgoingTransfer, state: SendState) -> None:
        with self._lock:
            transfer.state = state
            if transfer in self._open:
                self._open.remove(transfer)
            transfer.ops.clear()  # staging buffers are no longer needed


def _group_ready(transfer: OutgoingTransfer) -> bool:
    """Its next unposted layer group (or its last, header only) has all its layers written."""
    if transfer.next_group >= len(transfer.groups):
        return True
    return transfer.groups[transfer.next_group][1] <= transfer.ready_until


def _check_in_order(transfer: OutgoingTransfer, layer_start: int, layer_end: int) -> None:
    if layer_start > transfer.ready_until:
        raise ValueError(
            f"send_layers({layer_start}, {layer_end}) skips layers [{transfer.ready_until}, "
            f"{layer_start}) of transfer seq {transfer.desc.pair_seq}; layers must be "
            "reported in order")


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()

