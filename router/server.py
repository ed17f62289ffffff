"""The router's gRPC front end: `pdserve.v1.Generation` over any `GenerationBackend`.

`Generate` is a thin transport over the transport-neutral `FrontEnd` (router/frontend.py),
which the OpenAI-compatible HTTP app (router/openai_app.py) shares: validation, the in-flight
ids, deadlines, cancellation and metrics live there. Here each `TokenEvent` becomes one
GenerateResponse (the last with finish_reason, usage, timing) and each error the front end
raises a status code (router.errors): a client cancel arrives as `asyncio.CancelledError` and
aborts the request; a call without a deadline gets the server's `request_timeout_s`; our timer
fires DEADLINE_MARGIN_S before gRPC's own, so the client reads our DEADLINE_EXCEEDED message.

An `Abort` RPC ends the aborted request's stream normally (status OK) with finish_reason
"abort", as the proto documents, rather than with CANCELLED: the stream did end as the
service intended, and the client still gets usage and timing.

The server also runs the standard health service ("" and the Generation service; SERVING while
the backend is ready, NOT_SERVING once draining) and server reflection, and, given a
metrics port, serves its Prometheus metrics (router.metrics) at http://host:port/metrics.
Requests are parsed by router.wire (invalid UTF-8 or garbage bytes: INVALID_ARGUMENT, counted);
TLS (router.tls) and bearer tokens (router.auth) are optional, set by a `RouterSecurity`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pdserve.v1 import generation_pb2
from router.auth import BearerTokenInterceptor
from router.backend import GenerationBackend, GenerationInput, TokenEvent
from pdserve.metrics import MetricsEndpoint, start_metrics_server
from router.errors import RouterError, status_code_for
from router.frontend import FrontEnd
from router.guard import guarded
from router.http_server import HttpServer, start_http_server
from router.metrics import GRPC, RouterMetrics
from router.openai_app import OpenAIApp
from router.security import RouterSecurity
from router.tls import server_credentials
from router.validation import validate_drain
from router.wire import MalformedRequest, add_generation_service

logger = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"
DEFAULT_PORT = 50051
HEALTH_POLL_S = 1.0  # how often the health status follows backend.is_ready()
_NO_DEADLINE_S = 1e9  # time_remaining() above this means the client set no deadline
# Our timer fires this much before gRPC's own deadline cancellation, so that the request is
# aborted by our code path and the client reads our DEADLINE_EXCEEDED message.
DEADLINE_MARGIN_S = 0.02


class RouterServicer:
    """The gRPC transport over the `FrontEnd`: Generate writes its events as GenerateResponse
    messages and maps the front end's errors to status codes; the other RPCs are unary."""

    def __init__(self, backend: GenerationBackend, metrics: RouterMetrics | None = None,
                 request_timeout_s: float | None = None, front: FrontEnd | None = None) -> None:
        self.front = front or FrontEnd(backend, metrics, request_timeout_s)
        self._backend = self.front.backend

    @property
    def metrics(self) -> RouterMetrics:
        return self.front.metrics

    def drain(self) -> None:
        """Refuse new Generate calls with UNAVAILABLE; calls in flight run to completion."""
        self.front.drain()

    async def Generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                       context: grpc.aio.ServicerContext) -> None:
        async def write(inp: GenerationInput, event: TokenEvent) -> None:
            await context.write(_response(inp.request_id, event))

        try:
            await self.front.generate(request, write, remaining_s=_time_remaining_s(context),
                                      transport=GRPC)
        except RouterError as error:  # client-safe already (router.frontend)
            await context.abort(status_code_for(error), str(error))

    def _backend_ready(self) -> bool:
        return self._backend.is_ready()

    @guarded("Abort", _backend_ready)
    async def Abort(self, request: generation_pb2.AbortRequest | MalformedRequest,
                    context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        _check_parsed(request)
        request_id = request.request_id
        found = request_id in self.front.in_flight and await self._backend.abort(request_id)
        return generation_pb2.AbortResponse(found=found)

    @guarded("GetModelInfo", _backend_ready)
    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest | MalformedRequest,
                           context: grpc.aio.ServicerContext) -> generation_pb2.ModelInfo:
        _check_parsed(request)
        return self._backend.model_info()

    @guarded("DrainInstance", _backend_ready)
    async def DrainInstance(self, request: generation_pb2.DrainInstanceRequest | MalformedRequest,
                            context: grpc.aio.ServicerContext
                            ) -> generation_pb2.DrainInstanceResponse:
        _check_parsed(request)
        timeout_s = validate_drain(request)
        started = time.monotonic()
        moved = await self._backend.drain_instance(request.instance_id, timeout_s)
        return generation_pb2.DrainInstanceResponse(num_requests_moved=moved,
                                                    duration_s=time.monotonic() - started)

    @guarded("GetClusterState", _backend_ready)
    async def GetClusterState(self,
                              request: generation_pb2.GetClusterStateRequest | MalformedRequest,
                              context: grpc.aio.ServicerContext) -> generation_pb2.ClusterState:
        _check_parsed(request)
        return generation_pb2.ClusterState(instances=await self._backend.cluster_state())


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise request.error


def _response(request_id: str, event: TokenEvent) -> generation_pb2.GenerateResponse:
    response = generation_pb2.GenerateResponse(request_id=request_id, token_ids=event.token_ids,
                                                text=event.text, logprobs=event.logprobs)
    if event.finish_reason is not None:
        response.finish_reason = event.finish_reason
        response.usage.prompt_tokens = event.num_prompt_tokens
        response.usage.completion_tokens = event.num_output_tokens
        response.usage.cached_tokens = event.num_cached_tokens
        if event.timing is not None:
            response.timing.CopyFrom(event.timing.to_proto())
    return response


def _time_remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    remaining_s = context.time_remaining()
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return max(remaining_s - DEADLINE_MARGIN_S, 0.0)


class RouterServer:
    """A started router: the gRPC server, its health status and the backend behind it."""

    def __init__(self, server: grpc.aio.Server, servicer: RouterServicer,
                 health_servicer: health.aio.HealthServicer, backend: GenerationBackend,
                 host: str, port: int, metrics_endpoint: MetricsEndpoint | None = None,
                 http: HttpServer | None = None) -> None:
        self.http = http  # the OpenAI-compatible HTTP API; None: not served
        self._server = server
        self._servicer = servicer
        self._health = health_servicer
        self._backend = backend
        self.host = host
        self.port = port  # the bound port (the OS's pick when 0 was asked for)
        self.metrics_endpoint = metrics_endpoint  # None: metrics are kept but not served
        self._health_task: asyncio.Task | None = None

    @property
    def metrics(self) -> RouterMetrics:
        return self._servicer.metrics

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start_health(self) -> None:
        """Publish the backend's readiness now, and keep following it until draining starts."""
        await self._set_health(self._backend.is_ready())
        self._health_task = asyncio.create_task(self._follow_backend_health())

    async def _follow_backend_health(self) -> None:
        while True:
            await self._set_health(self._backend.is_ready())
            await asyncio.sleep(HEALTH_POLL_S)

    async def drain(self) -> None:
        """NOT_SERVING from now on; new calls get UNAVAILABLE, calls in flight continue."""
        if self._health_task is not None:
            self._health_task.cancel()
        self._servicer.drain()
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain, give calls in flight `grace_s` to finish, cancel the rest, stop the backend."""
        await self.drain()
        if self.http is not None:
            await self.http.stop(grace_s)
        await self._server.stop(grace_s)
        await self._backend.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()

    async def wait_for_termination(self) -> None:
        # Shielded: grpc.aio awaits its own shutdown future here, so cancelling this wait would
        # cancel that future and make a later `stop()` raise CancelledError.
        await asyncio.shield(self._server.wait_for_termination())

    async def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)


async def start_router(backend: GenerationBackend, host: str = "127.0.0.1",
                       port: int = DEFAULT_PORT, metrics_port: int | None = None, *,
                       metrics_host: str | None = None, request_timeout_s: float | None = None,
                       security: RouterSecurity | None = None, http_port: int | None = None,
                       http_host: str | None = None) -> RouterServer:
    """Start `backend`, then serve it on host:port (0 = any free port; see `RouterServer.port`)
    and, unless `metrics_port` is None, its metrics on http://metrics_host:metrics_port/metrics
    (`metrics_host` None: `host`). `request_timeout_s` is the deadline of calls that set none
    (None: no deadline); `security` sets TLS and tokens (None: plaintext, no tokens), for the
    gRPC port and the HTTP one alike. Unless `http_port` is None, the OpenAI-compatible HTTP
    API (router/openai_app.py) is served on http_host:http_port (`http_host` None: `host`)."""
    security = security or RouterSecurity()
    credentials = server_credentials(security.tls) if security.tls is not None else None
    await backend.start()
    servicer = RouterServicer(backend, request_timeout_s=request_timeout_s)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             interceptors=_interceptors(security, servicer.metrics))
    add_generation_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound_port = (server.add_insecure_port(address) if credentials is None
                  else server.add_secure_port(address, credentials))
    http = None
    if http_port is not None:
        app = OpenAIApp(servicer.front, security.auth_token).app
        http = await start_http_server(app, http_host or host, http_port, security.tls)
    metrics_endpoint = None
    if metrics_port is not None:
        metrics_endpoint = start_metrics_server(servicer.metrics.registry, metrics_host or host,
                                                metrics_port)
    await server.start()
    router = RouterServer(server, servicer, health_servicer, backend, host, bound_port,
                          metrics_endpoint, http)
    await router.start_health()
    logger.info("router serving %s on %s", backend.model_info().model_name, router.address)
    return router


def _interceptors(security: RouterSecurity,
                  metrics: RouterMetrics) -> list[grpc.aio.ServerInterceptor]:
    if security.auth_token is None and security.admin_token is None:
        return []

    def count_refused(method: str, code: grpc.StatusCode) -> None:
        if method == GENERATE_METHOD:
            metrics.refused(code)

    return [BearerTokenInterceptor(security.auth_token, security.admin_token, count_refused)]
