"""The router's security settings: TLS files and bearer tokens, loaded once at start.

Tokens come from a file or an environment variable, never from a command-line value (which
`ps` shows every user on the host):

    auth token:  the file `server.auth_token_file`, else $PDSERVE_AUTH_TOKEN, else none (open)
    admin token: the file `server.admin_token_file`, else $PDSERVE_ADMIN_TOKEN, else none
                 (Abort, GetClusterState and DrainInstance then take the normal token)

A token file holds the token alone; surrounding whitespace (a trailing newline) is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from router.tls import ServerTls

AUTH_TOKEN_ENV = "PDSERVE_AUTH_TOKEN"
ADMIN_TOKEN_ENV = "PDSERVE_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class RouterSecurity:
    """TLS for the gRPC port and the tokens its calls must carry; the defaults are all off."""

    tls: ServerTls | None = None  # None: plaintext gRPC
    auth_token: str | None = None  # None: Generation calls need no token
    admin_token: str | None = None  # None: the admin RPCs take the auth token

    def __post_init__(self) -> None:
        for name in ("auth_token", "admin_token"):
            token = getattr(self, name)
            if token is not None and (not token or any(c.isspace() for c in token)):
                raise ValueError(f"{name} must be non-empty and contain no whitespace")

    @classmethod
    def load(cls, *, tls_cert_file: str = "", tls_key_file: str = "",
             tls_client_ca_file: str = "", auth_token_file: str = "",
             admin_token_file: str = "",
             environ: Mapping[str, str] = os.environ) -> RouterSecurity:
        """Settings from config file paths ("" = not set) and the environment."""
        tls = None
        if tls_cert_file or tls_key_file:
            tls = ServerTls(tls_cert_file, tls_key_file, tls_client_ca_file)
        elif tls_client_ca_file:
            raise ValueError("a client CA file needs a server certificate and key (mutual TLS)")
        return cls(tls=tls,
                   auth_token=read_token(auth_token_file, AUTH_TOKEN_ENV, environ),
                   admin_token=read_token(admin_token_file, ADMIN_TOKEN_ENV, environ))


def read_token(path: str, env_var: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token in the file at `path` if given, else in `env_var`, else None."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read the token file {path}: "
                             f"{error.strerror or error}") from None
        if not token:
            raise ValueError(f"the token file {path} is empty")
        return token
    return environ.get(env_var, "").strip() or None
