"""The router's Prometheus metrics: every Generate call as its client sees it, for any backend.

One `RequestMetrics` follows one call, fed by the front-end core (router/frontend.py) in the
call's own order, whichever transport it came by (gRPC or the OpenAI-compatible HTTP API):

    begin ──> in flight, waiting (no token yet)
      │ first token ──> time_to_first_token; no longer waiting; prompt tokens counted
      │ later tokens ─> inter_token_latency (a message of k tokens: k gaps of gap/k);
      │                 the first of them also request_phase{phase="first_decode_token"}
      │ finish reason > e2e latency, time per output token, request_success{finished_reason},
      │                 phases queue / prefill / kv_transfer from the backend's Timing
      └ end ─────────> router_requests{transport,code}; a non-OK call also
                       router_request_errors{transport,error_type}

`code` is the call's status in gRPC's names for either transport (router/errors.py maps both
transports' errors to them); `transport` is "grpc" or "http". A call that the token check
refuses never reaches the core; `refused(code, transport)` counts it (code UNAUTHENTICATED or
PERMISSION_DENIED, error_type "unauthenticated").

The per-token path is a clock read, a counter increment and a histogram observation, on
children resolved once per router (no label lookups).
"""

from __future__ import annotations

import re
import time

import grpc
from prometheus_client import CollectorRegistry

from pdserve.metrics import (
    ITL_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    MetricFactory,
)
from router.backend import TokenEvent
from router.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    NoCapacityError,
    OverloadedError,
    RequestFailedError,
    RouterError,
    UnavailableError,
)

# Codes the router returns; their series exist from the start (others appear when first used).
STATUS_CODES = tuple(code.name for code in (
    grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED))
FINISH_REASONS = ("stop", "length", "abort")
# Where a request's time went before its first decode token (see router.backend.Timing).
PHASES = ("queue", "prefill", "kv_transfer", "first_decode_token")
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
INTERNAL = "internal"
UNAUTHENTICATED = "unauthenticated"
GRPC = "grpc"
HTTP = "http"
TRANSPORTS = (GRPC, HTTP)


def error_type(error: RouterError) -> str:
    """The `error_type` label of a backend or validation error (see `_error_type_of`)."""
    return _error_type_of(type(error))


def _error_type_of(cls: type[RouterError]) -> str:
    """The class name in snake case, without "Error": `OverloadedError` -> "overloaded"."""
    name = cls.__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


ERROR_TYPES = tuple(_error_type_of(cls) for cls in (
    InvalidRequestError, DuplicateRequestError, OverloadedError, UnavailableError,
    NoCapacityError, RequestFailedError)) + (DEADLINE_EXCEEDED, CANCELLED, INTERNAL,
                                            UNAUTHENTICATED)


class RouterMetrics:
    """Every router metric, labelled with the served model, in a registry of this router's own."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        f = MetricFactory(model_name, self.registry)
        self.requests = f.counter_by_each(
            "router_requests", "Generation calls by transport and final status (gRPC's names)",
            "transport", TRANSPORTS, "code", STATUS_CODES)
        self.errors = f.counter_by_each(
            "router_request_errors", "Failed generation calls by the error that ended them",
            "transport", TRANSPORTS, "error_type", ERROR_TYPES)
        self.success = f.counter_by("request_success",
                                    "Requests that streamed to their finish, by finish reason",
                                    "finished_reason", FINISH_REASONS)
        self.in_flight = f.gauge("router_num_requests_in_flight", "Generate calls in progress")
        self.waiting = f.gauge("router_num_requests_waiting",
                               "Generate calls in progress that have no token yet")
        self.prompt_tokens = f.counter("prompt_tokens",
                                       "Prompt tokens of requests that got a token")
        self.generation_tokens = f.counter("generation_tokens", "Tokens streamed to clients")
        self.ttft = f.histogram("time_to_first_token_seconds",
                                "Arrival until the first token is handed to gRPC", TTFT_BUCKETS_S)
        self.itl = f.histogram("inter_token_latency_seconds",
                               "Time between consecutive streamed tokens", ITL_BUCKETS_S)
        self.tpot = f.histogram("request_time_per_output_token_seconds",
                                "Per request: first to last token over the tokens after the first",
                                ITL_BUCKETS_S)
        self.e2e = f.histogram("e2e_request_latency_seconds",
                               "Arrival until the last token", REQUEST_LATENCY_BUCKETS_S)
        phases = f.histogram_by("request_phase_seconds",
                                "Per request: queue, prefill, KV transfer, then the wait from the "
                                "first token to the first decode token", "phase", PHASES,
                                TTFT_BUCKETS_S)
        self.queue_time, self.prefill_time, self.transfer_time, self.first_decode_time = (
            phases[phase] for phase in PHASES)

    def begin(self, arrival_s: float, transport: str = GRPC) -> RequestMetrics:
        """A generation call arrived (at `time.monotonic()` `arrival_s`) by `transport`."""
        return RequestMetrics(self, arrival_s, transport)

    def refused(self, code: grpc.StatusCode, transport: str = GRPC) -> None:
        """A generation call was refused by the token check with `code`."""
        self.requests[transport][code.name].inc()
        self.errors[transport][UNAUTHENTICATED].inc()


class RequestMetrics:
    """One generation call's observations; `end()` exactly once, after everything else."""

    __slots__ = ("_m", "_transport", "_arrival_s", "_first_s", "_last_s", "_num_tokens", "_code",
                 "_error_type")

    def __init__(self, metrics: RouterMetrics, arrival_s: float, transport: str = GRPC) -> None:
        self._m = metrics
        self._transport = transport
        self._arrival_s = arrival_s
        self._first_s: float | None = None
        self._last_s = 0.0
        self._num_tokens = 0
        self._code = grpc.StatusCode.OK
        self._error_type: str | None = None
        metrics.in_flight.inc()
        metrics.waiting.inc()

    def on_event(self, event: TokenEvent) -> None:
        """The event is about to be written to the client."""
        now = time.monotonic()
        m = self._m
        num_new = len(event.token_ids)
        if num_new:
            m.generation_tokens.inc(num_new)
            if self._first_s is None:
                self._first_s = now
                m.waiting.dec()
                m.ttft.observe(now - self._arrival_s)
                m.prompt_tokens.inc(event.num_prompt_tokens)
            else:
                if self._num_tokens == 1:
                    m.first_decode_time.observe(now - self._first_s)
                gap_s = (now - self._last_s) / num_new
                for _ in range(num_new):
                    m.itl.observe(gap_s)
            self._last_s = now
            self._num_tokens += num_new
        if event.finish_reason is not None:
            self._finish(event, now)

    def _finish(self, event: TokenEvent, now: float) -> None:
        m = self._m
        m.success[event.finish_reason].inc()
        m.e2e.observe(now - self._arrival_s)
        if self._num_tokens > 1:
            m.tpot.observe((self._last_s - self._first_s) / (self._num_tokens - 1))
        timing = event.timing
        if timing is None:
            return
        if timing.prefill_s > 0:  # 0.0: the request never reached a prefill
            m.queue_time.observe(timing.queue_s)
            m.prefill_time.observe(timing.prefill_s)
        if timing.kv_transfer_s > 0:  # 0.0: colocated, or no KV moved
            m.transfer_time.observe(timing.kv_transfer_s)

    def fail(self, code: grpc.StatusCode, error_type_label: str) -> None:
        """The call ends with `code` instead of OK."""
        self._code = code
        self._error_type = error_type_label

    def end(self) -> None:
        m = self._m
        m.in_flight.dec()
        if self._first_s is None:
            m.waiting.dec()
        m.requests[self._transport][self._code.name].inc()
        if self._error_type is not None:
            m.errors[self._transport][self._error_type].inc()
