"""Errors a backend or the request validation raises, and the one table that maps them to gRPC.

Backends raise these types, never grpc errors, so that the colocated and the disaggregated
backends fail the same way and the gRPC layer stays the only place that knows status codes:

    InvalidRequestError   -> INVALID_ARGUMENT    the request can never succeed as sent
    DuplicateRequestError -> ALREADY_EXISTS      its request_id names a request still in flight
    OverloadedError       -> RESOURCE_EXHAUSTED  queue or KV cache full: retry later, elsewhere
    UnavailableError      -> UNAVAILABLE         no live worker, draining or stopped: retry
    NoCapacityError       -> UNAVAILABLE         no instance could ever take it right now
    RequestFailedError    -> UNAVAILABLE when `retryable` (a worker died, a KV transfer failed),
                             INTERNAL otherwise (a bug: the engine raised)
    DeadlineExceededError -> DEADLINE_EXCEEDED   the call's deadline passed; the request was aborted
    InternalError         -> INTERNAL            a bug; its message holds only an error id

The gRPC codes are also the router's transport-neutral vocabulary (metrics label `code`); the
HTTP API maps the same errors to HTTP statuses (router/openai_errors.py).
"""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """Base of every error the router turns into a gRPC status."""


class InvalidRequestError(RouterError, ValueError):
    """The request is malformed; `field` names the offending request field (e.g. `sampling.top_p`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DuplicateRequestError(InvalidRequestError):
    """A request with the same request_id is still being served."""

    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"request {request_id!r} is already in flight")


class OverloadedError(RouterError):
    """Too many outstanding requests, or the KV cache is full: shed this one now."""


class UnavailableError(RouterError):
    """The backend cannot serve right now (starting, draining, stopped, no live worker)."""


class NoCapacityError(UnavailableError):
    """No instance of the needed role is alive to take the request."""


class RequestFailedError(RouterError):
    """An admitted request failed while running; `retryable` says whether a retry may work."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DeadlineExceededError(RouterError):
    """The call's deadline (the client's, else the server's request timeout) passed."""


class InternalError(RouterError):
    """A bug in the router or a backend; the message is client-safe (an error id only)."""


# Most specific first: the first matching type wins.
_STATUS_CODES: tuple[tuple[type[RouterError], grpc.StatusCode], ...] = (
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InternalError, grpc.StatusCode.INTERNAL),
)


def status_code_for(error: RouterError) -> grpc.StatusCode:
    """The gRPC status code a client receives for `error`."""
    if isinstance(error, RequestFailedError):
        return grpc.StatusCode.UNAVAILABLE if error.retryable else grpc.StatusCode.INTERNAL
    for error_type, code in _STATUS_CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL
