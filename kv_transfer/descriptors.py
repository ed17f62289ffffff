"""TransferDescriptor and TransferResult helpers shared by both ends of a pair.

The control plane hands the same TransferDescriptor to the prefill (sender) and the decode
(receiver) instance; both validate it against their channel and cache before moving a byte.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.compat import KVLayoutSpec
from kv_transfer.errors import KVTransferError
from kv_transfer.planner import KVShard
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2


def new_descriptor(
    pair_key: str,
    pair_seq: int,
    request_id: str,
    num_tokens: int,
    num_blocks: int,
    layers: tuple[int, int],
    layers_per_message: int,
    transfer_id: str = "",
) -> worker_pb2.TransferDescriptor:
    """A descriptor for `num_blocks` blocks of layers [layers[0], layers[1])."""
    return worker_pb2.TransferDescriptor(
        protocol_version=PROTOCOL_VERSION, transfer_id=transfer_id or uuid.uuid4().hex,
        pair_key=pair_key, pair_seq=pair_seq, request_id=request_id, num_tokens=num_tokens,
        num_blocks=num_blocks, layer_start=layers[0], layer_end=layers[1],
        layers_per_message=layers_per_message,
    )


@dataclass(frozen=True, slots=True)
class ShardDescriptor:
    """The part of one transfer that one rank pair carries on its own channel: `desc` is the
    transfer's descriptor with that channel's pair_key and the shard's layer range (model
    coordinates), `heads` the shard's KV heads [start, end) (model coordinates)."""

    desc: worker_pb2.TransferDescriptor
    heads: tuple[int, int]


def shard_descriptor(desc: worker_pb2.TransferDescriptor, pair_key: str,
                     shard: KVShard) -> ShardDescriptor:
    """The part `shard` (planner.ShardMessage.shard) of transfer `desc` on channel `pair_key`:
    the same request, blocks and sequence number, the shard's layers and heads, at most
    `desc.layers_per_message` layers per message. Both ends derive it the same way from the
    one descriptor of the transfer and the plan."""
    part = worker_pb2.TransferDescriptor()
    part.CopyFrom(desc)
    part.pair_key = pair_key
    part.layer_start, part.layer_end = shard.layers
    part.layers_per_message = max(1, min(desc.layers_per_message, shard.num_layers))
    return ShardDescriptor(part, shard.heads)


DEFAULT_MIN_MESSAGE_BYTES = 32 << 20  # 32 MiB: ~300 GB/s per NCCL message on NVLink


def layers_per_message_for(num_layers: int, layer_bytes: int, min_layers: int = 1,
                           min_message_bytes: int = 0) -> int:
    """Layers per KV message for a request whose KV is `layer_bytes` per layer: at least
    `min_layers`, and enough that a message carries >= `min_message_bytes` (NCCL moves 1 MiB
    at 18 GB/s and 64 MiB at 329 GB/s between two H200s: short prompts must not go layer by
    layer). Never more than `num_layers` (then the whole KV is one message)."""
    if num_layers < 1 or layer_bytes < 1 or min_layers < 1 or min_message_bytes < 0:
        raise ValueError(f"need num_layers, layer_bytes, min_layers >= 1 and min_message_bytes "
                         f">= 0, got {num_layers}, {layer_bytes}, {min_layers}, "
                         f"{min_message_bytes}")
    by_bytes = -(-min_message_bytes // layer_bytes)
    return min(num_layers, max(min_layers, by_bytes))


def validate_descriptor(
    desc: worker_pb2.TransferDescriptor, spec: KVLayoutSpec, pair_key: str,
    heads: tuple[int, int] | None = None,
) -> None:
    """Raise ValueError naming the field when `desc` (with KV `heads`, None: every head of
    this rank) cannot run on this channel: its layers and heads must be this rank's."""
    if desc.protocol_version != PROTOCOL_VERSION:
        raise ValueError(f"TransferDescriptor.protocol_version {desc.protocol_version} "
                         f"is not {PROTOCOL_VERSION}")
    if desc.pair_key != pair_key:
        raise ValueError(f"TransferDescriptor.pair_key {desc.pair_key!r} is for another "
                         f"channel; this one is {pair_key!r}")
    if not desc.request_id:
        raise ValueError("TransferDescriptor.request_id must not be empty")
    if desc.num_blocks < 1:
        raise ValueError(f"TransferDescriptor.num_blocks must be >= 1, got {desc.num_blocks}")
    if desc.num_tokens > desc.num_blocks * spec.block_size:
        raise ValueError(f"TransferDescriptor.num_tokens {desc.num_tokens} does not fit in "
                         f"{desc.num_blocks} blocks of {spec.block_size}")
    held = spec.shard
    if not held.layers[0] <= desc.layer_start < desc.layer_end <= held.layers[1]:
        raise ValueError(f"TransferDescriptor layers [{desc.layer_start}, {desc.layer_end}) "
                         f"are not a non-empty range within this rank's layers "
                         f"[{held.layers[0]}, {held.layers[1]})")
    if heads is not None and not held.heads[0] <= heads[0] < heads[1] <= held.heads[1]:
        raise ValueError(f"shard KV heads [{heads[0]}, {heads[1]}) are not a non-empty range "
                         f"within this rank's heads [{held.heads[0]}, {held.heads[1]})")
    if desc.layers_per_message < 1:
        raise ValueError("TransferDescriptor.layers_per_message must be >= 1, "
                         f"got {desc.layers_per_message}")


def layer_groups(desc: worker_pb2.TransferDescriptor) -> list[tuple[int, int]]:
    """The [start, end) layer range of each KV message, in wire order."""
    step = desc.layers_per_message
    return [(start, min(start + step, desc.layer_end))
            for start in range(desc.layer_start, desc.layer_end, step)]


def block_ids_tensor(
    block_ids: Sequence[int], desc: worker_pb2.TransferDescriptor, kv_cache: torch.Tensor
) -> torch.Tensor:
    """`block_ids` as an int64 tensor on the cache's device, after host-side checks."""
    ids = [int(block_id) for block_id in block_ids]
    if len(ids) != desc.num_blocks:
        raise ValueError(f"got {len(ids)} block ids for a transfer of {desc.num_blocks} blocks")
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids must be distinct, got {ids}")
    num_cache_blocks = kv_cache.shape[1]
    bad = [block_id for block_id in ids if not 0 <= block_id < num_cache_blocks]
    if bad:
        raise ValueError(f"block ids {bad} are outside the cache's {num_cache_blocks} blocks")
    return torch.tensor(ids, dtype=torch.int64, device=kv_cache.device)


def transfer_result(
    desc: worker_pb2.TransferDescriptor,
    status: int,
    *,
    message: str = "",
    num_bytes: int = 0,
    duration_s: float = 0.0,
    tail_s: float = 0.0,
) -> worker_pb2.TransferResult:
    return worker_pb2.TransferResult(
        protocol_version=PROTOCOL_VERSION, transfer_id=desc.transfer_id,
        request_id=desc.request_id, pair_seq=desc.pair_seq, status=status, message=message,
        num_bytes=num_bytes, duration_s=duration_s, tail_s=tail_s,
    )


def failure_result(
    desc: worker_pb2.TransferDescriptor, error: KVTransferError, duration_s: float = 0.0
) -> worker_pb2.TransferResult:
    """The TransferResult to report for a transfer that raised `error`."""
    return transfer_result(desc, error.status, message=str(error), duration_s=duration_s)
