"""The prefill -> decode KV hand-off.

    control plane (router)              prefill instance              decode instance
    ----------------------              ----------------              ---------------
                                                                      host_store() (one, kept alive)
    PairEndpoint(host, port, gen) -->   join_store()
                                        PairChannel.connect(PREFILL)  PairChannel.connect(DECODE)
                                               (handshake: KVLayoutSpec hashes must match)
    TransferDescriptor(seq, ...)  -->   KVSender.begin(desc)          KVReceiver.receive(desc)
                                        send_layers(l0, l1) ...  ---> header, layer groups
                                        finish() -> TransferResult <-- ack -> TransferResult

Between multi-rank instances the transfer is one shard (layer range x KV-head range) per
(prefill rank, decode rank) pair of the transfer plan (planner.py), each over that pair's own
channel, all under the one descriptor of the transfer (shards.py counts their outcomes); the two
instances' layouts may differ (the KV is re-sharded on the way).

Modules: planner (which prefill rank sends which shard to which decode rank), compat (layout
spec and hash), packing (one gather / one scatter per layer group, heads sliced inside),
rendezvous (store and pair keys), handshake, process_group (standalone 2-rank Gloo/NCCL),
channel (PairChannel and its states), wire (header and ack), descriptors, sender, receiver,
faults (FaultInjection), errors (one exception type per TransferStatus).

Block ownership: the prefill keeps its blocks until finish() returns or raises; the decode's
blocks hold the request's KV only once receive() returned OK. On any KVTransferError the pair
channel is aborted; rebuild it under rendezvous.pair_key(..., generation + 1).
"""

from kv_transfer.channel import ChannelConfig, ChannelState, PairChannel, PairRole
from kv_transfer.compat import KVLayoutSpec, check_compatible, compat_hash
from kv_transfer.descriptors import (DEFAULT_MIN_MESSAGE_BYTES, failure_result,
                                     layers_per_message_for, new_descriptor)
from kv_transfer.errors import (
    KVTransferConnectionError,
    KVTransferError,
    KVTransferIncompatibleError,
    KVTransferProtocolError,
    KVTransferTimeoutError,
)
from kv_transfer.faults import FaultInjection
from kv_transfer.packing import pack_blocks, unpack_blocks
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import host_store, join_store, pair_key
from kv_transfer.sender import KVSender, OutgoingTransfer, SendState

__all__ = [
    "DEFAULT_MIN_MESSAGE_BYTES", "ChannelConfig", "ChannelState", "FaultInjection",
    "KVLayoutSpec", "KVReceiver", "KVSender",
    "KVTransferConnectionError", "KVTransferError", "KVTransferIncompatibleError",
    "KVTransferProtocolError", "KVTransferTimeoutError", "OutgoingTransfer", "PairChannel",
    "PairRole", "SendState", "check_compatible", "compat_hash", "failure_result", "host_store",
    "join_store", "layers_per_message_for", "new_descriptor", "pack_blocks", "pair_key",
    "unpack_blocks",
]
