"""The pair channel's handshake, exchanged through the pair's store before any tensor moves.

    prefill (rank 0)                         decode (rank 1)
      set "handshake/hello" = Handshake  ->    wait "handshake/hello", compare with its own
      wait "handshake/reply"             <-    set "handshake/reply" = HandshakeReply
      compare reply.handshake with own

Both ends compare (every layout field but the parallel layout and rank, which must map onto
each other: planner.py), so a mismatch raises KVTransferIncompatibleError on both, before either
builds a process group. A peer that never answers raises KVTransferTimeoutError.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NoReturn

from torch._C._distributed_c10d import Store

from kv_transfer.compat import KVLayoutSpec, compat_hash, differing_fields, mapping_problems
from kv_transfer.errors import KVTransferIncompatibleError, KVTransferTimeoutError
from kv_transfer.wire import WIRE_VERSION
from protos.pdserve.v1 import kv_transfer_pb2

HELLO_KEY = "handshake/hello"
REPLY_KEY = "handshake/reply"


def build_handshake(spec: KVLayoutSpec, instance_id: str, key: str) -> kv_transfer_pb2.Handshake:
    return kv_transfer_pb2.Handshake(
        protocol_version=WIRE_VERSION, compat_hash=compat_hash(spec),
        model_name=spec.model_name, dtype=spec.dtype, block_size=spec.block_size,
        kv_layout=spec.kv_layout, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, pdserve_version=spec.pdserve_version,
        parallel_layout=spec.parallel_layout, rank=spec.rank,
        instance_id=instance_id, pair_key=key,
    )


def spec_from_handshake(handshake: kv_transfer_pb2.Handshake) -> KVLayoutSpec:
    return KVLayoutSpec(
        model_name=handshake.model_name, dtype=handshake.dtype, block_size=handshake.block_size,
        num_layers=handshake.num_layers, num_kv_heads=handshake.num_kv_heads,
        head_dim=handshake.head_dim, kv_layout=handshake.kv_layout,
        pdserve_version=handshake.pdserve_version,
        parallel_layout=handshake.parallel_layout, rank=handshake.rank,
    )


def handshake_problems(
    local: kv_transfer_pb2.Handshake, remote: kv_transfer_pb2.Handshake,
    local_is_prefill: bool = True,
) -> list[str]:
    """Every reason the two ends cannot exchange KV; empty when they can. Every field but the
    parallel layout and rank must be equal; those two must map (the plan pairs these ranks)."""
    problems = []
    if local.protocol_version != remote.protocol_version:
        problems.append(f"protocol_version: local={local.protocol_version} "
                        f"remote={remote.protocol_version}")
    try:
        remote_spec = spec_from_handshake(remote)
    except ValueError as exc:
        return problems + [f"remote layout is invalid: {exc}"]
    if remote.compat_hash != compat_hash(remote_spec):
        problems.append("compat_hash: the remote hash does not match its own fields "
                        "(different hashing; upgrade both ends to the same pdserve)")
    local_spec = spec_from_handshake(local)
    diffs = differing_fields(local_spec, remote_spec)
    if diffs:  # mapping layouts of different models means nothing
        return problems + diffs
    prefill, decode = (local_spec, remote_spec) if local_is_prefill else (remote_spec, local_spec)
    return problems + mapping_problems(prefill, decode)


def exchange_as_prefill(
    store: Store, local: kv_transfer_pb2.Handshake, timeout_s: float
) -> kv_transfer_pb2.Handshake:
    """Rank 0's side: send ours, await the decode side's verdict; returns its Handshake."""
    store.set(HELLO_KEY, local.SerializeToString())
    reply = kv_transfer_pb2.HandshakeReply.FromString(_await(store, REPLY_KEY, timeout_s))
    problems = handshake_problems(local, reply.handshake, local_is_prefill=True)
    if problems or not reply.accepted:
        _refuse(local, reply.handshake, problems or [reply.reason])
    return reply.handshake


def exchange_as_decode(
    store: Store, local: kv_transfer_pb2.Handshake, timeout_s: float
) -> kv_transfer_pb2.Handshake:
    """Rank 1's side: await the prefill's Handshake, answer it; returns the prefill's."""
    remote = kv_transfer_pb2.Handshake.FromString(_await(store, HELLO_KEY, timeout_s))
    problems = handshake_problems(local, remote, local_is_prefill=False)
    reply = kv_transfer_pb2.HandshakeReply(
        protocol_version=WIRE_VERSION, accepted=not problems, reason="; ".join(problems),
        mismatched_fields=[problem.split(":", 1)[0] for problem in problems], handshake=local,
    )
    store.set(REPLY_KEY, reply.SerializeToString())
    if problems:
        _refuse(local, remote, problems)
    return remote


def _await(store: Store, key: str, timeout_s: float) -> bytes:
    try:
        store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
    except RuntimeError as exc:
        raise KVTransferTimeoutError(
            f"KV handshake: no {key!r} from the peer within {timeout_s:.1f}s "
            f"(is the other instance connecting to the same pair key?)"
        ) from exc
    return store.get(key)


def _refuse(
    local: kv_transfer_pb2.Handshake, remote: kv_transfer_pb2.Handshake, problems: list[str]
) -> NoReturn:
    raise KVTransferIncompatibleError(
        f"pair {local.pair_key}: instance {local.instance_id or '?'} cannot exchange KV with "
        f"{remote.instance_id or '?'}: " + "; ".join(problems)
    )
