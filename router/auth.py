"""Bearer-token checks on the router's gRPC calls, as one grpc.aio server interceptor.

A call carries its token as `authorization: Bearer <token>` metadata. Per method:

    /grpc.health.v1.Health/*          no token: load balancers and orchestrators probe health
                                      without credentials, and it reveals only SERVING or not
    Abort, GetClusterState,
    DrainInstance                     the admin token when one is set, else the auth token
    everything else (Generate, GetModelInfo, reflection)   the auth token when one is set

A call without the needed token gets UNAUTHENTICATED; a call with a valid auth token on an
admin method gets PERMISSION_DENIED. Tokens are compared in constant time. A refused call's
request bytes are never parsed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from router.wire import SERVICE

BEARER = "bearer "
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_METHODS = frozenset(f"/{SERVICE.full_name}/{name}"
                          for name in ("Abort", "GetClusterState", "DrainInstance"))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that lack the token their method needs; see the module docstring."""

    def __init__(self, auth_token: str | None, admin_token: str | None = None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self._auth_token = _encoded(auth_token)
        self._admin_token = _encoded(admin_token) or self._auth_token
        self._on_refused = on_refused  # (method, code) of each refused call, for metrics

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        needed = self._token_for(details.method)
        if handler is None or needed is None:
            return handler
        presented = _bearer_token(details.invocation_metadata)
        if presented is not None and hmac.compare_digest(presented, needed):
            return handler
        if (presented is not None and self._auth_token is not None
                and hmac.compare_digest(presented, self._auth_token)):
            return self._refuse(details.method, handler, grpc.StatusCode.PERMISSION_DENIED,
                                "this RPC needs the admin token")
        return self._refuse(details.method, handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid token: send 'authorization: Bearer <token>' "
                            "metadata")

    def _token_for(self, method: str) -> bytes | None:
        if method.startswith(OPEN_METHOD_PREFIXES):
            return None
        return self._admin_token if method in ADMIN_METHODS else self._auth_token

    def _refuse(self, method: str, handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                message: str) -> grpc.RpcMethodHandler:
        if self._on_refused is not None:
            self._on_refused(method, code)
        return refusing_handler(handler, code, message)


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                     message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends every call with `code`, leaving requests as bytes."""
    async def refuse(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(refuse, response_serializer=handler.response_serializer)


def _bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip().encode()
    return None


def _encoded(token: str | None) -> bytes | None:
    return None if token is None else token.encode()
