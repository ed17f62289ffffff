"""PairChannel: the point-to-point link between one prefill (rank 0) and one decode (rank 1).

Lifecycle (ChannelState):
    connect() --handshake ok, group built--> READY --close()--> CLOSED
                                               |
                      abort(), or any failed post or wait
                                               v
                                             BROKEN
`PairChannel.connect` returns a READY channel or raises: it handshakes through the decode
instance's rendezvous store under the pair's own key (rendezvous.py, handshake.py), builds a
standalone two-rank Gloo or NCCL group (process_group.py), and makes one round trip on it. Nothing is global, so building or
tearing down one pair never affects another. A BROKEN or CLOSED channel is never reused: the
control plane rebuilds the pair under the next generation's key.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch._C._distributed_c10d import Backend, Store, Work

from kv_transfer.compat import KVLayoutSpec
from kv_transfer.errors import KVTransferConnectionError, KVTransferError
from kv_transfer.handshake import build_handshake, exchange_as_decode, exchange_as_prefill
from kv_transfer.process_group import as_transfer_error, backend_name, new_pair_group, wait_work
from kv_transfer.rendezvous import pair_store
from protos.pdserve.v1 import kv_transfer_pb2


class PairRole(enum.IntEnum):
    """A channel end; the value is its rank in the pair's process group."""

    PREFILL = 0  # sends KV
    DECODE = 1  # receives KV; hosts the rendezvous store


class ChannelState(enum.Enum):
    READY = "ready"
    BROKEN = "broken"  # a failure or abort(); every pending and later operation fails
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """How to build one end of a pair channel."""

    pair_key: str  # rendezvous.pair_key(prefill, decode, generation); same on both ends
    role: PairRole
    instance_id: str = ""  # this instance, for error messages
    device: str = "cpu"  # transport: "cpu" -> Gloo, "cuda[:n]" -> NCCL (both ends on CUDA)
    connect_timeout_s: float = 30.0  # handshake plus process-group construction
    bind_host: str | None = None  # address Gloo listens on; None = this host's name

    def __post_init__(self) -> None:
        if not self.pair_key:
            raise ValueError("ChannelConfig.pair_key must not be empty")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        device_type = torch.device(self.device).type
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"ChannelConfig.device must be cpu or cuda, got {self.device!r}")
        if device_type == "cuda" and os.environ.get("CUDA_MODULE_LOADING") != "EAGER":
            # Seen on H200s: with lazy loading, the first launch of a kernel (the scatter of a
            # received layer) waits behind a spinning NCCL receive, so a stalled peer hangs the
            # receiver instead of timing it out.
            raise ValueError(
                "NCCL pair channels need CUDA_MODULE_LOADING=EAGER in the worker's environment, "
                "set before CUDA initializes (e.g. Ray runtime_env env_vars); or use "
                "device='cpu' to carry the KV over Gloo")


class PendingOp:
    """One posted send or recv; its tensor stays referenced until waited or the channel dies."""

    __slots__ = ("what", "_work", "_tensor")

    def __init__(self, what: str, work: Work, tensor: torch.Tensor) -> None:
        self.what = what
        self._work: Work | None = work
        self._tensor: torch.Tensor | None = tensor


def resolve_device(device: str) -> torch.device:
    """`cuda` means this process's current CUDA device (a Ray GPU actor sees its GPU as cuda:0):
    tensors carry an index, so the channel's device must too."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class PairChannel:
    """A standalone two-rank process group plus the state needed to fail fast and cleanly."""

    def __init__(self, config: ChannelConfig, spec: KVLayoutSpec, group: Backend,
                 remote: kv_transfer_pb2.Handshake) -> None:
        self.config = config
        self.spec = spec
        self.remote = remote  # the peer's handshake
        self.device = resolve_device(config.device)
        self._group: Backend | None = group
        self._lock = threading.Lock()
        self._pending: set[PendingOp] = set()
        self._state = ChannelState.READY
        self._reason = ""

    @classmethod
    def connect(cls, store: Store, config: ChannelConfig, spec: KVLayoutSpec) -> PairChannel:
        """Handshake with the peer and build the pair's group; both ends call this.

        `store` is the decode instance's rendezvous store (its host_store(), or a join_store()
        client). The channel works on a clone of it: a store connection serves one blocking wait
        at a time, and every pair of a decode instance may connect concurrently.
        """
        deadline = time.monotonic() + config.connect_timeout_s
        scoped = pair_store(store.clone(), config.pair_key)
        local = build_handshake(spec, config.instance_id, config.pair_key)
        exchange = exchange_as_prefill if config.role is PairRole.PREFILL else exchange_as_decode
        remote = exchange(scoped, local, config.connect_timeout_s)
        group = new_pair_group(scoped, int(config.role), resolve_device(config.device),
                               max(deadline - time.monotonic(), 0.001), config.bind_host)
        channel = cls(config, spec, group, remote)
        channel._probe(deadline - time.monotonic())
        return channel

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def pair_key(self) -> str:
        return self.config.pair_key

    @property
    def backend(self) -> str:
        return backend_name(self.device)

    @property
    def peer_rank(self) -> int:
        return 1 - int(self.config.role)

    def send(self, tensor: torch.Tensor) -> PendingOp:
        """Post a send of `tensor` to the peer; complete it with wait()."""
        return self._post("send", tensor)

    def recv(self, tensor: torch.Tensor) -> PendingOp:
        """Post a receive from the peer into `tensor`; complete it with wait()."""
        return self._post("recv", tensor)

    def wait(self, op: PendingOp, timeout_s: float) -> None:
        """Complete `op` within `timeout_s`, or abort the channel and raise a KVTransferError."""
        work = op._work
        if work is None:
            raise self._dead_error(op.what)
        try:
            wait_work(work, timeout_s, self.device, f"pair {self.pair_key}: {op.what}")
        except KVTransferError as exc:
            self.abort(str(exc))
            raise
        finally:
            with self._lock:
                self._pending.discard(op)
            op._work = op._tensor = None

    def abort(self, reason: str) -> None:
        """Tear the group down now; pending and later operations fail (the peer's too)."""
        self._teardown(ChannelState.BROKEN, reason)

    def close(self) -> None:
        """Release the group; the channel cannot be used again."""
        self._teardown(ChannelState.CLOSED, "closed")

    def __enter__(self) -> PairChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _probe(self, timeout_s: float) -> None:
        """One tiny round trip, so the link is known to work (and NCCL has created its
        communicator for both directions) before any transfer relies on it."""
        probe = torch.zeros(1, device=self.device)
        first, second = (self.send, self.recv) if self.config.role is PairRole.PREFILL else (
            self.recv, self.send)
        deadline = time.monotonic() + timeout_s
        self.wait(first(probe), deadline - time.monotonic())
        self.wait(second(probe), deadline - time.monotonic())

    def _post(self, kind: str, tensor: torch.Tensor) -> PendingOp:
        if tensor.device != self.device:
            raise ValueError(f"pair {self.pair_key} carries {self.device} tensors, "
                             f"got one on {tensor.device}")
        what = f"{kind} {tuple(tensor.shape)}"
        try:
            with self._lock:
                if self._group is None:
                    raise self._dead_error(kind)
                post = self._group.send if kind == "send" else self._group.recv
                op = PendingOp(what, post([tensor], self.peer_rank, 0), tensor)
                self._pending.add(op)
            return op
        except RuntimeError as exc:  # Gloo refuses to post on a pair the peer already closed
            error = as_transfer_error(exc, f"pair {self.pair_key}: {what}")
            self.abort(str(error))
            raise error from exc

    def _teardown(self, state: ChannelState, reason: str) -> None:
        with self._lock:
            if self._group is None:
                return
            group, self._group = self._group, None
            self._state, self._reason = state, reason
            for op in self._pending:
                op._work = op._tensor = None
            self._pending.clear()
        try:
            if state is ChannelState.BROKEN:
                group.abort()
            else:
                group.shutdown()
        except RuntimeError:
            pass  # already failing; dropping the group below is what frees it
        # Dropping the last reference closes the group's sockets, which the peer notices.
        del group

    def _dead_error(self, what: str) -> KVTransferConnectionError:
        return KVTransferConnectionError(
            f"pair {self.pair_key}: cannot {what}: channel is {self._state.value} "
            f"({self._reason or 'no reason given'})"
        )
