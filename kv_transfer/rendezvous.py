"""Where pair channels meet: one TCPStore per decode instance, one key prefix per pair.

A decode instance hosts a single rendezvous store for all its pairs (`host_store`, port 0 picks
a free port; keep the object alive and publish `store.port` through the control plane as a
PairEndpoint). Prefill instances reach it with `join_store`. Every pair channel works on its
own connection (a clone) under the pair's own prefix, `pair_key`,
which names the prefill, the decode and a generation: after a failure the pair is rebuilt under
generation + 1, so nothing left over from the broken channel can be read by the new one.
"""

from __future__ import annotations

import socket
from datetime import timedelta

from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from kv_transfer.errors import KVTransferConnectionError

STORE_PREFIX = "pdserve/kv"


def host_store(host: str, port: int = 0, timeout_s: float = 30.0) -> TCPStore:
    """Start the decode instance's rendezvous store on `host` alone; read the bound port from
    `.port`. TCPStore itself listens on every interface whatever host it is given, so the
    listening socket is bound here and handed over (docs/SECURITY.md)."""
    try:
        listener = _listen(host, port)
        return TCPStore(host, listener.getsockname()[1], None, True,
                        timedelta(seconds=timeout_s), wait_for_workers=False,
                        master_listen_fd=listener.detach())  # the store owns the fd now
    except (OSError, RuntimeError) as exc:
        raise KVTransferConnectionError(
            f"cannot host the KV rendezvous store on {host}:{port}: {exc}"
        ) from exc


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def join_store(host: str, port: int, timeout_s: float = 30.0) -> TCPStore:
    """Connect to a decode instance's rendezvous store (retries until `timeout_s`)."""
    try:
        return TCPStore(host, port, None, False, timedelta(seconds=timeout_s),
                        wait_for_workers=False)
    except RuntimeError as exc:
        raise KVTransferConnectionError(
            f"cannot reach the KV rendezvous store at {host}:{port} within {timeout_s}s "
            f"(is the decode instance up and its store port published?): "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def pair_key(prefill_instance_id: str, decode_instance_id: str, generation: int) -> str:
    """The key of one generation of the channel between two instances."""
    for name, value in (("prefill_instance_id", prefill_instance_id),
                        ("decode_instance_id", decode_instance_id)):
        if not value or "/" in value:
            raise ValueError(f"{name} must be non-empty and contain no '/', got {value!r}")
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    return f"{prefill_instance_id}->{decode_instance_id}@g{generation}"


def rank_pair_key(key: str, rank: int, decode_rank: int | None = None) -> str:
    """The channel from prefill rank `rank` to decode rank `decode_rank` (default: the same
    rank) within instance pair `key`: rank 0 -> rank 0 is the pair's own key (one-rank
    instances keep theirs), rank i -> rank i appends "/rank{i}", other pairs "/p{i}-d{j}"."""
    decode_rank = rank if decode_rank is None else decode_rank
    if rank < 0 or decode_rank < 0:
        raise ValueError(f"ranks must be >= 0, got prefill {rank}, decode {decode_rank}")
    if rank == decode_rank:
        return key if rank == 0 else f"{key}/rank{rank}"
    return f"{key}/p{rank}-d{decode_rank}"


def pair_store(store: Store, key: str) -> PrefixStore:
    """The view of `store` that one pair channel reads and writes."""
    return PrefixStore(f"{STORE_PREFIX}/{key}", store)
