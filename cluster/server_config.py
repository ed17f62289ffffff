"""The `server:` section of the cluster config (cluster/config.py): the router's endpoints,
admission limits and security."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config_checks import at_least, check_port, check_types, positive
from router.security import RouterSecurity


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The router's client-facing endpoints, admission limits and security (README "Security").

    Every endpoint listens on loopback unless `grpc_host` (`pdserve serve --host`) opts in to
    other interfaces. The OpenAI-compatible HTTP API is off unless `http_port` is set. Tokens
    are read from files or the environment, never from the config itself (router/security.py).
    """

    grpc_host: str = "127.0.0.1"  # interface the gRPC server binds; "0.0.0.0" = every interface
    grpc_port: int = 50051  # 0 = any free port (tests)
    metrics_host: str = ""  # interface of the router's /metrics; "" = the same as grpc_host
    metrics_port: int = 8000  # the router's Prometheus /metrics; 0 = any free port
    # The OpenAI-compatible HTTP API (/v1/completions, ...): None = off, 0 = any free port.
    http_port: int | None = None
    http_host: str = ""  # interface of the HTTP API; "" = the same as grpc_host
    worker_metrics_port_base: int = 0  # worker i serves /metrics on base + i; 0 = free ports
    # Prometheus file_sd file listing every /metrics endpoint, kept current; "" = none.
    prometheus_sd_file: str = "/tmp/pdserve/prometheus_sd.json"
    max_queued_requests: int = 1024  # waiting requests beyond this get RESOURCE_EXHAUSTED
    request_timeout_s: float = 600.0  # deadline for a request whose client set none
    tls_cert_file: str = ""  # PEM certificate for TLS on the gRPC port; "" = plaintext
    tls_key_file: str = ""  # its PEM private key (required with tls_cert_file)
    tls_client_ca_file: str = ""  # PEM CA that client certificates must chain to: mutual TLS
    auth_token_file: str = ""  # bearer token every call needs; "" = $PDSERVE_AUTH_TOKEN or none
    admin_token_file: str = ""  # token Abort/GetClusterState need; "" = $PDSERVE_ADMIN_TOKEN

    def __post_init__(self) -> None:
        check_types(self, "server")
        if not self.grpc_host:
            raise ValueError("server.grpc_host must not be empty")
        for name in ("grpc_port", "metrics_port", "worker_metrics_port_base"):
            check_port(f"server.{name}", getattr(self, name))
        if self.http_port is not None:
            check_port("server.http_port", self.http_port)
        at_least("server.max_queued_requests", self.max_queued_requests, 1)
        positive("server.request_timeout_s", self.request_timeout_s)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("server.tls_client_ca_file (mutual TLS) needs server.tls_cert_file "
                             "and server.tls_key_file")

    @property
    def metrics_bind_host(self) -> str:
        """The interface the router's /metrics listens on."""
        return self.metrics_host or self.grpc_host

    @property
    def http_bind_host(self) -> str:
        """The interface the OpenAI-compatible HTTP API listens on."""
        return self.http_host or self.grpc_host

    def router_security(self) -> RouterSecurity:
        """TLS files and tokens, read now from the token files or the environment."""
        return RouterSecurity.load(
            tls_cert_file=self.tls_cert_file, tls_key_file=self.tls_key_file,
            tls_client_ca_file=self.tls_client_ca_file, auth_token_file=self.auth_token_file,
            admin_token_file=self.admin_token_file)
