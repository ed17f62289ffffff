"""What a client is told when an RPC fails, and what only the server log sees.

A client gets a status code and a short message of ours, never an exception's text: that may
hold paths, host names, memory reports or another user's command line. The rules:

    RouterError (our own, written for clients)      -> its code and its message, except
    RequestFailedError (its text comes from workers) -> its code, "... (error id X)"
    any other exception (a bug)                      -> INTERNAL "internal error (id X)", or
                                                        UNAVAILABLE while the backend is not ready

Every error id is logged with the full detail (the traceback, or the worker's message), so a
user who reports the id points at the log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc

from router.errors import (InternalError, RequestFailedError, RouterError, UnavailableError,
                           status_code_for)

logger = logging.getLogger(__name__)

_Response = TypeVar("_Response")
_Handler = Callable[..., Awaitable[_Response]]


def new_error_id() -> str:
    """A short random id that ties a client's message to the server log's line."""
    return secrets.token_hex(6)


def client_safe(error: RouterError, rpc: str) -> RouterError:
    """`error` as a client may see it: a worker's `RequestFailedError` is logged under a new
    error id and replaced by one of the same kind whose message holds only that id."""
    if not isinstance(error, RequestFailedError):
        return error
    error_id = new_error_id()
    logger.error("%s failed (error id %s): %s", rpc, error_id, error)
    if not error.retryable:
        return RequestFailedError(f"internal error (id {error_id})", retryable=False)
    return RequestFailedError(f"the request failed in a worker; retry it (error id {error_id})",
                              retryable=True)


def client_status(error: RouterError, rpc: str) -> tuple[grpc.StatusCode, str]:
    """The code and message a client receives for `error` (logged first when it is a worker's)."""
    safe = client_safe(error, rpc)
    return status_code_for(safe), str(safe)


def unexpected_error(rpc: str, backend_ready: bool) -> RouterError:
    """Log the exception being handled with a new error id; the error a client receives."""
    error_id = new_error_id()
    logger.exception("%s failed (error id %s)", rpc, error_id)
    if not backend_ready:
        return UnavailableError(f"the server is not ready; retry later (error id {error_id})")
    return InternalError(f"internal error (id {error_id})")


def unexpected_status(rpc: str, backend_ready: bool) -> tuple[grpc.StatusCode, str]:
    """Log the exception being handled with a new error id; the status a client receives."""
    error = unexpected_error(rpc, backend_ready)
    return status_code_for(error), str(error)


async def abort_with(context: grpc.aio.ServicerContext,
                     status: tuple[grpc.StatusCode, str]) -> NoReturn:
    """End the call with `status` (grpc.aio raises AbortError out of `context.abort`)."""
    await context.abort(*status)


def guarded(rpc: str, is_ready: Callable[[object], bool]
            ) -> Callable[[_Handler[_Response]], _Handler[_Response]]:
    """Decorate a unary servicer method so that any failure becomes a client-safe status.

    `is_ready(servicer)` tells whether the backend is ready, which decides INTERNAL vs UNAVAILABLE.
    """
    def decorate(method: _Handler[_Response]) -> _Handler[_Response]:
        @functools.wraps(method)
        async def wrapper(self, request, context: grpc.aio.ServicerContext) -> _Response:
            try:
                return await method(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except RouterError as error:
                await abort_with(context, client_status(error, rpc))
            except Exception:  # a bug; the client must not see its text
                await abort_with(context, unexpected_status(rpc, is_ready(self)))
        return wrapper
    return decorate
