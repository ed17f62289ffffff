"""The OpenAI-compatible HTTP API: a FastAPI app, a thin transport over the router's `FrontEnd`.

    GET  /health                200 while every pool is ready and the server is not draining,
                                503 otherwise (no token needed, like grpc.health.v1)
    GET  /v1/models             the served model
    POST /v1/completions        a prompt (text or token ids)
    POST /v1/chat/completions   messages, rendered by the model's chat template

A generation call, end to end:

    body (at most MAX_BODY_BYTES) ─> pydantic model (router/openai_protocol.py) ─> model name
    checked ─> GenerateRequest ─> FrontEnd.generate (validation, backend, deadline, metrics
    with transport="http") ─> each TokenEvent: one SSE chunk (`data: {...}`), or collected
    into one JSON body ─> `data: [DONE]`

A stream's status line and headers go out with its first token, so that admission errors
(overload, a bad prompt) still get their own status: 400 naming the field, 404 for another
model's name, 429 when overloaded, 503 when no instance is live or the server drains, 504 when
the deadline (`server.request_timeout_s`) passes, 401 without the token when one is set, 500
for a bug (an error id only; the traceback is in the server log). An error after the first
chunk ends the stream with one `data: {"error": ...}` chunk and `[DONE]`. The response runs
beside a watch on the connection: a client that disconnects cancels the call, which aborts the
request in every worker (the same path as a cancelled gRPC call) and counts it CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from protos.pdserve.v1 import generation_pb2
from router.backend import GenerationInput, TokenEvent
from router.errors import InvalidRequestError, RouterError
from router.frontend import FrontEnd
from router.metrics import HTTP
from router.openai_errors import ApiError, error_body, from_router_error, from_validation_error
from router.openai_protocol import ChatCompletionRequest, CompletionRequest
from router.wire import MalformedRequest
from router.openai_responses import (ChatBuilder, CompletionBuilder, ModelCard, ModelList,
                                     ResponseBuilder)

MAX_BODY_BYTES = 4 << 20  # as gRPC's default receive limit
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
JSON_HEADERS = [(b"content-type", b"application/json")]
DONE = b"data: [DONE]\n\n"


class OpenAIApp:
    """The routes over one `FrontEnd`; `auth_token` set: every route but /health needs it."""

    def __init__(self, front: FrontEnd, auth_token: str | None = None) -> None:
        self.front = front
        self._token = None if auth_token is None else auth_token.encode()
        info = front.backend.model_info()
        self.model_name = info.model_name
        self._card = ModelCard(id=info.model_name, created=int(time.time()),
                               max_model_len=info.context_length)
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_exception_handler(ApiError, _api_error_response)
        return app

    async def health(self) -> Response:
        serving = self.front.is_serving()
        return JSONResponse({"status": "ok" if serving else "unavailable"},
                            status_code=200 if serving else 503)

    async def models(self, request: Request) -> Response:
        self._authenticate(request, counted=False)
        return _json(ModelList(data=[self._card]))

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, CompletionRequest, CompletionBuilder, "cmpl",
                                      input_param="prompt")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, ChatCompletionRequest, ChatBuilder, "chatcmpl",
                                      input_param="messages")

    async def _generation(self, request: Request, model_cls: type[CompletionRequest]
                          | type[ChatCompletionRequest], builder_cls: type[ResponseBuilder],
                          id_prefix: str, input_param: str) -> Response:
        """A bad body is answered by the front end too, so that it is counted like any other
        invalid call (as a `MalformedRequest`, the way router.wire hands over bad gRPC bytes)."""
        self._authenticate(request, counted=True)
        call_id = f"{id_prefix}-{secrets.token_hex(12)}"
        logprobs, stream, include_usage = False, False, False
        try:
            body = model_cls.model_validate_json(await _read_body(request))
            self._check_model(body.model)
            requests = body.generate_requests(call_id)
            logprobs, stream, include_usage = body.wants_logprobs, body.stream, body.include_usage
        except ValidationError as error:
            requests = [MalformedRequest(from_validation_error(error))]
        except InvalidRequestError as error:
            requests = [MalformedRequest(error)]
        builder = builder_cls(call_id, self.model_name, self.front.backend.tokenizer, logprobs,
                              len(requests))
        return GenerationResponse(self.front, requests, builder, stream, include_usage,
                                  input_param)

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name[:200]!r} does not exist; this server serves "
                                f"{self.model_name!r} (GET /v1/models)",
                           "not_found_error", "model", "model_not_found")

    def _authenticate(self, request: Request, counted: bool) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(),
                                                               self._token):
            return
        if counted:
            self.front.metrics.refused(grpc.StatusCode.UNAUTHENTICATED, HTTP)
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <token>'",
                       "invalid_request_error", None, "invalid_api_key")


class GenerationResponse(Response):
    """One generation call run as the ASGI response, beside a watch on the client's connection.

    Streamed: headers with the first chunk; non-streamed: one JSON body at the end. A client
    that disconnects (either way) cancels the call: the front end aborts its requests. `n`
    choices run as `n` concurrent requests; the first error ends them all."""

    def __init__(self, front: FrontEnd,
                 requests: list[generation_pb2.GenerateRequest | MalformedRequest],
                 builder: ResponseBuilder, stream: bool, include_usage: bool,
                 input_param: str) -> None:
        self._front = front
        self._requests = requests
        self._builder = builder
        self._stream = stream
        self._include_usage = include_usage
        self._input_param = input_param
        self._started = False  # the status line and headers went out
        self._sending = asyncio.Lock()  # choices' chunks, one whole message at a time
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        run = asyncio.ensure_future(self._run(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not run.done():
                run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    async def _run(self, send: Callable) -> None:
        builder = self._builder
        try:
            await self._generate_all(send)
        except RouterError as error:
            api_error = from_router_error(error, self._input_param)
            if not self._started:
                await _send_json(send, api_error.status, error_body(api_error))
            else:
                data = b"data: " + json.dumps(error_body(api_error)).encode() + b"\n\n"
                await _send_body(send, data + DONE, more=False)
            return
        if self._stream:
            tail = _sse(builder.usage_chunk()) if self._include_usage else b""
            await _send_body(send, tail + DONE, more=False)
        else:
            await _send_json(send, 200, builder.response().model_dump_json().encode())

    async def _generate_all(self, send: Callable) -> None:
        if len(self._requests) == 1:
            await self._generate(self._requests[0], send, 0)
            return
        try:
            async with asyncio.TaskGroup() as group:
                for index, request in enumerate(self._requests):
                    group.create_task(self._generate(request, send, index))
        except ExceptionGroup as group:
            errors = [e for e in group.exceptions if isinstance(e, RouterError)]
            if len(errors) != len(group.exceptions):
                raise
            raise errors[0] from None

    def _generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                  send: Callable, index: int) -> Awaitable[None]:
        async def write(inp: GenerationInput, event: TokenEvent) -> None:
            if not self._stream:
                self._builder.add(event, index)
                return
            self._builder.note(event, index)
            data = _sse(self._builder.chunk(event, index))
            async with self._sending:
                if not self._started:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": SSE_HEADERS})
                    self._started = True
                await _send_body(send, data, more=True)
            # uvicorn's send returns without suspending unless the socket is full: yield, so
            # that one stream whose events are ready cannot hold the loop until it ends.
            await asyncio.sleep(0)

        return self._front.generate(request, write, remaining_s=None, transport=HTTP)


async def _read_body(request: Request) -> bytes:
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                           "invalid_request_error", None, "body_too_large")
    return bytes(data)


def _sse(body: BaseModel) -> bytes:
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


def _json(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


async def _send_body(send: Callable, data: bytes, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _send_json(send: Callable, status: int, body: dict | bytes) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await _send_body(send, data, more=False)


async def _disconnected(receive: Callable) -> None:
    """Returns once the client has gone (the request body was read before the response)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _api_error_response(request: Request, error: ApiError) -> Response:
    return JSONResponse(error_body(error), status_code=error.status)
