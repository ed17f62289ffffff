"""The router's transport-neutral front end: one generation call, whichever transport brought it.

The gRPC servicer (router/server.py) and the OpenAI-compatible HTTP app (router/openai_app.py)
are thin transports over one `FrontEnd`. Each turns its request into a `GenerateRequest`, hands
the front end a callback that writes one `TokenEvent` in its own format, and maps the errors
the front end raises to its own status codes:

    GenerateRequest ─> FrontEnd.generate(request, write, remaining_s, transport)
        draining or not ready ──────────────────────────> UnavailableError
        validate + tokenize (RequestValidator) ─> register request_id
        backend.generate(inp) ─> write(inp, event) per TokenEvent ─> unregister

One call's early endings, each of which closes the backend's iterator, which aborts the request
in every worker and frees its KV blocks:
- the client goes away (gRPC cancel, HTTP disconnect): the transport cancels the task that
  awaits `generate`; `asyncio.CancelledError` passes through, counted as CANCELLED;
- the deadline passes (the client's, else the server's `request_timeout_s`):
  `DeadlineExceededError`;
- the backend or the validation raises a `RouterError`: raised again, client-safe: a worker's
  `RequestFailedError` text goes to the log under an error id and the client gets the id;
- any other exception is a bug: `InternalError` (or `UnavailableError` while the backend is not
  ready) with an error id, the traceback in the log (router.guard);
- the transport's own `write` raises: that exception passes through unchanged.

Every call is counted in router.metrics with its transport and its final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc

from protos.pdserve.v1 import generation_pb2
from router.backend import GenerationBackend, GenerationInput, TokenEvent
from router.errors import DeadlineExceededError, RouterError, UnavailableError, status_code_for
from router.guard import client_safe, unexpected_error
from router.metrics import (CANCELLED, DEADLINE_EXCEEDED, INTERNAL, RequestMetrics, RouterMetrics,
                            error_type)
from router.validation import RequestValidator
from router.wire import MalformedRequest

EventWriter = Callable[[GenerationInput, TokenEvent], Awaitable[None]]
_RPC = "Generate"


class _WriteFailed(Exception):
    """The transport's writer raised; its exception is the cause."""


class FrontEnd:
    """Validates generation calls, streams the backend's events through a transport's writer,
    and owns the request ids in flight and the draining flag."""

    def __init__(self, backend: GenerationBackend, metrics: RouterMetrics | None = None,
                 request_timeout_s: float | None = None) -> None:
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {request_timeout_s}")
        self.backend = backend
        self.request_timeout_s = request_timeout_s  # the deadline of calls that set none
        self.validator = RequestValidator(backend.tokenizer, backend.model_info())
        self.metrics = metrics or RouterMetrics(backend.model_info().model_name)
        self.in_flight: set[str] = set()
        self._draining = False

    def drain(self) -> None:
        """Refuse new calls with UNAVAILABLE; calls in flight run to completion."""
        self._draining = True

    def is_serving(self) -> bool:
        """True while new calls are admitted: not draining and the backend is ready."""
        return not self._draining and self.backend.is_ready()

    async def generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                       write: EventWriter, *, remaining_s: float | None,
                       transport: str) -> None:
        """Run one call to its end; `remaining_s` is the client's deadline (None: the server's).
        Raises a client-safe `RouterError` on failure; see the module docstring."""
        arrival_s = time.monotonic()
        if remaining_s is None:
            remaining_s = self.request_timeout_s
        deadline_s = None if remaining_s is None else arrival_s + remaining_s
        observed = self.metrics.begin(arrival_s, transport)
        timer = asyncio.timeout(remaining_s)
        try:
            async with timer:
                await self._generate(request, write, arrival_s, deadline_s, observed)
        except TimeoutError:
            if not timer.expired():  # raised inside the backend, not by our deadline
                raise self._internal_error(observed) from None
            observed.fail(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_EXCEEDED)
            raise DeadlineExceededError(f"deadline of {remaining_s:.3f} s exceeded; the request "
                                        "was aborted") from None
        except RouterError as error:
            observed.fail(status_code_for(error), error_type(error))
            raise client_safe(error, _RPC) from None
        except asyncio.CancelledError:  # the client went away; the request is aborted already
            observed.fail(grpc.StatusCode.CANCELLED, CANCELLED)
            raise
        except _WriteFailed as failed:
            observed.fail(grpc.StatusCode.UNKNOWN, INTERNAL)
            raise failed.__cause__ from None
        except Exception:  # a bug: an error id for the client, the traceback for the log
            raise self._internal_error(observed) from None
        finally:
            observed.end()

    def _internal_error(self, observed: RequestMetrics) -> RouterError:
        error = unexpected_error(_RPC, self.backend.is_ready())
        observed.fail(status_code_for(error), INTERNAL)
        return error

    async def _generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                        write: EventWriter, arrival_s: float, deadline_s: float | None,
                        observed: RequestMetrics) -> None:
        if not self.is_serving():
            raise UnavailableError("the server is draining or not ready; retry another replica")
        inp = await self.validator.to_input(request, self.in_flight, arrival_s, deadline_s)
        self.in_flight.add(inp.request_id)  # no await since the uniqueness check
        try:
            await self._stream(inp, write, observed)
        finally:
            self.in_flight.discard(inp.request_id)

    async def _stream(self, inp: GenerationInput, write: EventWriter,
                      observed: RequestMetrics) -> None:
        # aclosing: an early exit (cancel, deadline) closes the iterator, which aborts the request.
        async with contextlib.aclosing(self.backend.generate(inp)) as events:
            async for event in events:
                observed.on_event(event)
                try:
                    await write(inp, event)
                except Exception as error:
                    raise _WriteFailed() from error
