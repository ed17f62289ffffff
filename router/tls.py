"""TLS for the router's gRPC port: server credentials, and the client's side of the handshake.

    server cert + key                  -> TLS: clients verify the server
    server cert + key + client CA file -> mutual TLS: the server also demands a client
                                          certificate signed by that CA (others fail the handshake)

Files are PEM. They are read once, when the router starts; a file that cannot be read is a
`ValueError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The router's certificate files; `client_ca_file` set = mutual TLS."""

    cert_file: str  # PEM certificate chain the router presents
    key_file: str  # PEM private key of that certificate
    client_ca_file: str = ""  # PEM CA bundle client certificates must chain to; "" = no mTLS

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise ValueError("TLS needs both a certificate file and a key file")

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """gRPC server credentials for `tls`, requiring a client certificate when it is mutual."""
    client_ca = read_pem(tls.client_ca_file, "client CA") if tls.mutual else None
    key_pair = (read_pem(tls.key_file, "TLS key"), read_pem(tls.cert_file, "TLS certificate"))
    return grpc.ssl_server_credentials([key_pair], root_certificates=client_ca,
                                       require_client_auth=tls.mutual)


def channel_credentials(root_cert_file: str | None = None, client_cert_file: str | None = None,
                        client_key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust `root_cert_file` (None: the system's roots), and present a
    client certificate for mutual TLS when both its files are given."""
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("a client certificate needs both its certificate and its key file")
    root = read_pem(root_cert_file, "root certificate") if root_cert_file else None
    key = read_pem(client_key_file, "client key") if client_key_file else None
    cert = read_pem(client_cert_file, "client certificate") if client_cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                        certificate_chain=cert)


def read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the {what} file {path}: {error.strerror or error}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"the {what} file {path} is not PEM (no -----BEGIN line)")
    return data
