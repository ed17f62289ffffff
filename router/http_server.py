"""The OpenAI-compatible HTTP API's server: uvicorn, embedded in the router's own event loop.

uvicorn runs as tasks of the loop that runs the gRPC server and the backend, so an HTTP call
reaches the `FrontEnd` (and the backend's in-flight table) without a thread hop or a lock.
We bind the socket ourselves (a taken port is an `OSError` naming it, where uvicorn would exit
the process) and leave signals alone (`pdserve serve` drains on SIGTERM itself). TLS follows
the gRPC port's settings: the same certificate, and client certificates when it is mutual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from router.tls import ServerTls

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A running uvicorn server on one socket; `stop()` ends it."""

    def __init__(self, server: _EmbeddedServer, sock: socket.socket, scheme: str) -> None:
        self._server = server
        self._socket = sock
        self.host, self.port = sock.getsockname()[:2]  # the bound port (0 asked: the OS's)
        self.scheme = scheme
        self._task = asyncio.create_task(server.main_loop(), name="http-main-loop")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give responses in flight `grace_s`, then cancel them."""
        self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._server.shutdown(sockets=[self._socket])
        self._socket.close()


async def start_http_server(app: FastAPI, host: str, port: int,
                            tls: ServerTls | None = None) -> HttpServer:
    """Serve `app` on host:port (0 = any free port)."""
    sock = _bind(host, port)
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=5, **_tls_options(tls))
    server = _EmbeddedServer(config)
    config.load()
    server.lifespan = config.lifespan_class(config)  # uvicorn sets it in serve(), not startup()
    try:
        await server.startup(sockets=[sock])
    except BaseException:
        sock.close()
        raise
    http = HttpServer(server, sock, "https" if tls is not None else "http")
    log.info("OpenAI-compatible HTTP API on %s", http.url)
    return http


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (IPPROTO_TCP) so that asyncio turns Nagle's
    algorithm off on every accepted connection (it checks the protocol): else an SSE chunk
    written right after the headers waits for the client's delayed ACK, 40 ms on Linux."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}; choose "
                      "another port (0 = any free port)") from exc
    sock.setblocking(False)
    return sock


def _tls_options(tls: ServerTls | None) -> dict:
    if tls is None:
        return {}
    options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.mutual:
        options |= {"ssl_ca_certs": tls.client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
