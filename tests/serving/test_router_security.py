"""Security defaults and options, through real grpc.aio routers on 127.0.0.1 and real clients:
loopback binds, TLS and mutual TLS with certificates this test makes (a real handshake), bearer
tokens and the separate admin token, health reachable without one.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import ServerConfig
from router.security import ADMIN_TOKEN_ENV, AUTH_TOKEN_ENV, RouterSecurity
from router.server import start_router
from router.tls import ServerTls
from tests.helpers import build_engine
from tests.serving.test_router import REPO_ROOT, RouterHarness, rpc_error

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the "
                                                        "test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOKEN = "user-token-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"


# ---- certificates ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pem:
    cert: str
    key: str


def _write(directory: Path, name: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Pem(str(cert_path), str(key_path))


def _certificate(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Pem]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    directory = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve test CA")])
    ca = _certificate("pdserve test CA", ca_key, ca_name, ca_key, ca=True)
    pems = {"ca": _write(directory, "ca", ca, ca_key)}
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca_name, ca_key, ca=False, server=name == "server")
        pems[name] = _write(directory, name, cert, key)
    return pems


@pytest.fixture
def start(default_loaded):
    """Factory: a router with `security` and a harness client with `client_options`."""
    harnesses = []

    def factory(security: RouterSecurity, **client_options) -> RouterHarness:
        harness = RouterHarness(build_engine(default_loaded, num_blocks=32), max_queued_requests=4,
                                client_options=client_options, security=security)
        harnesses.append(harness)
        return harness

    yield factory
    for harness in harnesses:
        harness.close()


def generate_code(harness: RouterHarness, **client_options) -> grpc.StatusCode:
    """The status of a one-token Generate from a new client with `client_options`."""
    client = harness.connect(**client_options)
    try:
        harness.run(client.generate("hi", max_tokens=1, timeout_s=20))
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        harness.run(client.close())


# ---- defaults: loopback only -------------------------------------------------------------------
def test_the_default_bind_address_is_loopback_for_grpc_and_metrics(default_loaded):
    server = ServerConfig()
    assert (server.grpc_host, server.metrics_bind_host) == ("127.0.0.1", "127.0.0.1")
    harness = RouterHarness(build_engine(default_loaded, num_blocks=32), max_queued_requests=4,
                            metrics_port=0)
    try:
        assert harness.server.host == "127.0.0.1"
        assert harness.server.metrics_endpoint.host == "127.0.0.1"
        for port in (harness.server.port, harness.server.metrics_endpoint.port):
            assert _listens_only_on_loopback(port)
    finally:
        harness.close()


def _listens_only_on_loopback(port: int) -> bool:
    """True when `port` accepts on 127.0.0.1 and not on this host's outward IPv4 address."""
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    outward = _outward_address()
    if outward.startswith("127."):
        return True  # no other interface to probe
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((outward, port)) != 0


def _outward_address() -> str:
    """The address this host's default route leaves from (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("10.255.255.255", 1))
        except OSError:
            return "127.0.0.1"
        return udp.getsockname()[0]


# ---- TLS ----------------------------------------------------------------------------------------
def test_tls_handshake_with_a_certificate_the_test_made(start, certs):
    security = RouterSecurity(tls=ServerTls(certs["server"].cert, certs["server"].key))
    harness = start(security, root_cert_file=certs["ca"].cert)
    done = harness.run(harness.client.generate("hi", max_tokens=2, timeout_s=20))
    assert done.finish_reason in ("stop", "length")
    assert generate_code(harness) == grpc.StatusCode.UNAVAILABLE  # plaintext cannot talk to it
    assert generate_code(harness, tls=True) == grpc.StatusCode.UNAVAILABLE  # untrusted CA


def test_mutual_tls_refuses_a_client_without_a_certificate(start, certs):
    security = RouterSecurity(tls=ServerTls(certs["server"].cert, certs["server"].key,
                                            client_ca_file=certs["ca"].cert))
    client_pem = certs["client"]
    harness = start(security, root_cert_file=certs["ca"].cert, client_cert_file=client_pem.cert,
                    client_key_file=client_pem.key)
    assert generate_code(harness, root_cert_file=certs["ca"].cert, client_cert_file=client_pem.cert,
                         client_key_file=client_pem.key) == grpc.StatusCode.OK
    assert generate_code(harness, root_cert_file=certs["ca"].cert) == grpc.StatusCode.UNAVAILABLE


def test_unreadable_tls_files_fail_before_the_backend_starts(tmp_path):
    security = RouterSecurity(tls=ServerTls(str(tmp_path / "missing.crt"), str(tmp_path / "k")))

    class NeverStarted:
        async def start(self):
            raise AssertionError("the backend started before the TLS files were read")

    with pytest.raises(ValueError, match="cannot read the TLS"):
        asyncio.run(start_router(NeverStarted(), "127.0.0.1", 0, security=security))


# ---- bearer tokens ------------------------------------------------------------------------------
def test_a_token_is_required_and_checked(start):
    harness = start(RouterSecurity(auth_token=TOKEN), token=TOKEN)
    assert generate_code(harness, token=TOKEN) == grpc.StatusCode.OK
    assert generate_code(harness) == grpc.StatusCode.UNAUTHENTICATED
    assert generate_code(harness, token=TOKEN + "x") == grpc.StatusCode.UNAUTHENTICATED
    assert harness.run(harness.client.cluster_state()).instances  # the normal token suffices
    refused = harness.server.metrics.registry.get_sample_value(
        "pdserve:router_requests_total",
        {"model_name": harness.backend.model_info().model_name, "transport": "grpc",
         "code": "UNAUTHENTICATED"})
    assert refused == 2


def test_health_needs_no_token(start):
    harness = start(RouterSecurity(auth_token=TOKEN, admin_token=ADMIN_TOKEN), token=ADMIN_TOKEN)
    with grpc.insecure_channel(harness.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_admin_token_guards_abort_cluster_state_and_drain(start):
    harness = start(RouterSecurity(auth_token=TOKEN, admin_token=ADMIN_TOKEN), token=ADMIN_TOKEN)
    assert harness.run(harness.client.cluster_state()).instances
    assert harness.run(harness.client.abort("nobody")) is False
    # the admin gets past the token check: a colocated server has nothing to drain
    drain = rpc_error(harness, harness.client.drain_instance("colocated-0"))
    assert drain.code() == grpc.StatusCode.INVALID_ARGUMENT
    user = harness.connect(token=TOKEN)
    try:
        assert harness.run(user.model_info()).context_length > 0
        for rpc in (user.cluster_state(), user.abort("nobody"), user.drain_instance("decode-0")):
            assert rpc_error(harness, rpc).code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        harness.run(user.close())
    anonymous = harness.connect()
    try:
        error = rpc_error(harness, anonymous.cluster_state())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        harness.run(anonymous.close())
    assert generate_code(harness, token=ADMIN_TOKEN) == grpc.StatusCode.UNAUTHENTICATED


def test_cli_client_sends_the_token_from_a_file_or_the_environment(start, tmp_path):
    harness = start(RouterSecurity(auth_token=TOKEN), token=TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != AUTH_TOKEN_ENV}
    with_file = _cli(harness, env, "--token-file", str(token_file))
    assert with_file.returncode == 0, with_file.stderr
    assert _cli(harness, {**env, AUTH_TOKEN_ENV: TOKEN}).returncode == 0
    refused = _cli(harness, env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _cli(harness: RouterHarness, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "pdserve", "client", "hi", "--max-tokens", "1",
                           "--address", harness.address, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT, env=env)


def test_tokens_come_from_files_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    environ = {AUTH_TOKEN_ENV: "from-env", ADMIN_TOKEN_ENV: ADMIN_TOKEN}
    loaded = RouterSecurity.load(auth_token_file=str(token_file), environ=environ)
    assert (loaded.auth_token, loaded.admin_token) == (TOKEN, ADMIN_TOKEN)
    assert RouterSecurity.load(environ=environ).auth_token == "from-env"
    assert RouterSecurity.load(environ={}) == RouterSecurity()
    with pytest.raises(ValueError, match="cannot read the token file"):
        RouterSecurity.load(auth_token_file=str(tmp_path / "missing"), environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        RouterSecurity.load(admin_token_file=str(tmp_path / "empty"), environ={})
