"""What travels on a pair channel for one transfer, and how each end checks it.

Per transfer, in pair_seq order, prefill -> decode:
    1. header: int64[10] = HEADER_FIELDS (magic, wire version, pair_seq, num_blocks, the KV
       shard: layer range and KV-head range in model coordinates, layers_per_message, a 64-bit
       hash of the request id). The receiver compares it with the shard it was given; any
       difference is a KVTransferProtocolError.
    2. one message per layer group [l, l + layers_per_message) of the shard (the last may be
       shorter): the packed blocks, shape [layers, num_blocks, 2, block_size, shard heads,
       head_dim].
then decode -> prefill:
    3. ack: int64[4] = ACK_FIELDS (magic, pair_seq, TransferStatus, payload bytes received).
       OK once the blocks are in place; PROTOCOL_ERROR when the header was refused.
Messages of consecutive transfers never interleave, so both ends post operations in the same
order (NCCL matches send/recv by order alone). Every message size follows from the header, and
the receiver posts no data receive before the header matched: Gloo terminates the process on a
size mismatch. Any failure aborts the channel.
"""

from __future__ import annotations

import hashlib

import torch

from protos.pdserve.v1 import worker_pb2

WIRE_VERSION = 2  # 2: the header names the shard's KV heads
HEADER_MAGIC = 0x7064_6B76_6864_7231  # "pdkvhdr1"
ACK_MAGIC = 0x7064_6B76_6163_6B31  # "pdkvack1"
HEADER_FIELDS = ("magic", "wire_version", "pair_seq", "num_blocks", "layer_start", "layer_end",
                 "head_start", "head_end", "layers_per_message", "request_hash")
ACK_FIELDS = ("magic", "pair_seq", "status", "num_bytes")


def request_hash(request_id: str) -> int:
    """A signed 64-bit digest of the request id (fits an int64 tensor element)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little", signed=True)


def expected_header(desc: worker_pb2.TransferDescriptor, heads: tuple[int, int]) -> list[int]:
    return [HEADER_MAGIC, WIRE_VERSION, desc.pair_seq, desc.num_blocks, desc.layer_start,
            desc.layer_end, heads[0], heads[1], desc.layers_per_message,
            request_hash(desc.request_id)]


def encode_header(desc: worker_pb2.TransferDescriptor, heads: tuple[int, int],
                  corrupt: bool = False) -> torch.Tensor:
    """The header tensor (CPU); `corrupt` flips the request hash, for fault injection."""
    values = expected_header(desc, heads)
    if corrupt:
        values[-1] ^= 1
    return torch.tensor(values, dtype=torch.int64)


def empty_header() -> torch.Tensor:
    return torch.zeros(len(HEADER_FIELDS), dtype=torch.int64)


def header_mismatches(header: torch.Tensor, desc: worker_pb2.TransferDescriptor,
                      heads: tuple[int, int]) -> list[str]:
    """'field: expected=... got=...' for every header field that disagrees with the shard."""
    got = header.tolist()
    return [f"{name}: expected={want} got={have}"
            for name, want, have in zip(HEADER_FIELDS, expected_header(desc, heads), got)
            if want != have]


def encode_ack(desc: worker_pb2.TransferDescriptor, status: int, num_bytes: int) -> torch.Tensor:
    return torch.tensor([ACK_MAGIC, desc.pair_seq, status, num_bytes], dtype=torch.int64)


def empty_ack() -> torch.Tensor:
    return torch.zeros(len(ACK_FIELDS), dtype=torch.int64)


def ack_mismatches(ack: torch.Tensor, desc: worker_pb2.TransferDescriptor) -> list[str]:
    """Problems with an ack for `desc` other than its status (magic or sequence number)."""
    magic, pair_seq, _, _ = ack.tolist()
    problems = []
    if magic != ACK_MAGIC:
        problems.append(f"ack magic: expected={ACK_MAGIC:#x} got={magic:#x}")
    if pair_seq != desc.pair_seq:
        problems.append(f"ack pair_seq: expected={desc.pair_seq} got={pair_seq}")
    return problems
