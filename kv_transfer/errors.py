"""Typed failures of the KV transfer path; each maps to one TransferStatus.

Every transfer either completes or raises one of these within its timeout. After any of them
except KVTransferIncompatibleError the pair channel is aborted: the caller frees the request's
blocks on its side and rebuilds the pair under a new generation key.
"""

from __future__ import annotations

from protos.pdserve.v1 import worker_pb2


class KVTransferError(Exception):
    """Base class: a KV hand-off between a prefill and a decode instance failed."""

    status: int = worker_pb2.TRANSFER_STATUS_FAILED


class KVTransferConnectionError(KVTransferError, ConnectionError):
    """The peer went away, the link broke, or the channel was already aborted or closed."""

    status = worker_pb2.TRANSFER_STATUS_FAILED


class KVTransferTimeoutError(KVTransferError, TimeoutError):
    """No progress within the timeout (the peer stalled, or never showed up)."""

    status = worker_pb2.TRANSFER_STATUS_TIMEOUT


class KVTransferProtocolError(KVTransferError):
    """The two ends disagreed about what was being sent (header or acknowledgement mismatch)."""

    status = worker_pb2.TRANSFER_STATUS_PROTOCOL_ERROR


class KVTransferIncompatibleError(KVTransferError, ValueError):
    """The two engines' KV layouts differ, so the channel was refused at the handshake."""

    status = worker_pb2.TRANSFER_STATUS_INCOMPATIBLE
