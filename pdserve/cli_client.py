"""`pdserve client` (stream one completion) and `pdserve admin` (cluster state, drain an
instance): gRPC clients of a running router, with its TLS and token options."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def add_parsers(sub) -> None:
    _add_client_parser(sub)
    _add_admin_parser(sub)


def _add_connection_args(p: argparse.ArgumentParser, token_help: str) -> None:
    from router.client import DEFAULT_ADDRESS

    p.add_argument("--address", default=DEFAULT_ADDRESS, help="router host:port")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA file (implies --tls)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
    p.add_argument("--token-file", default=None, metavar="PATH", help=token_help)


def _connect(args: argparse.Namespace, token_env: str):
    from router.client import PdserveClient
    from router.security import read_token

    token = read_token(args.token_file or "", token_env)
    return PdserveClient(args.address, tls=args.tls, root_cert_file=args.tls_ca,
                         client_cert_file=args.tls_cert, client_key_file=args.tls_key,
                         token=token)


def _rpc(call) -> object:
    """Run one client coroutine; a gRPC error becomes a one-line CLI error."""
    import grpc

    from pdserve.cli import CliError

    try:
        return asyncio.run(call)
    except grpc.aio.AioRpcError as error:
        raise CliError(f"{error.code().name}: {error.details()}") from None


# ---- `pdserve client` -----------------------------------------------------------------------------
def _add_client_parser(sub) -> None:
    p = sub.add_parser("client", help="stream one completion from a running pdserve router")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="send it as one user chat message")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the server's (256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the server's (1.0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline for the whole call")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, usage, timing) at the end")
    _add_connection_args(p, "file holding the bearer token (default: $PDSERVE_AUTH_TOKEN, if set)")
    p.set_defaults(handler=_run_client)


def _run_client(args: argparse.Namespace) -> int:
    completion = _rpc(_stream_completion(args))
    if args.json:
        print(json.dumps(completion.to_json_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


async def _stream_completion(args: argparse.Namespace):
    from router.client import Completion
    from router.security import AUTH_TOKEN_ENV

    inputs = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
              else {"prompt": args.prompt})
    completion = Completion()
    async with _connect(args, AUTH_TOKEN_ENV) as client:
        call = client.generate_stream(timeout_s=args.timeout, max_tokens=args.max_tokens,
                                      temperature=args.temperature, seed=args.seed, **inputs)
        async for response in call:
            completion.add(response)
            if not args.json:
                sys.stdout.write(response.text)
                sys.stdout.flush()
    return completion


# ---- `pdserve admin` ------------------------------------------------------------------------------
def _add_admin_parser(sub) -> None:
    p = sub.add_parser("admin", help="admin calls to a running router: state, drain")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    state = actions.add_parser("state", help="every instance: lifecycle status, KV blocks, load")
    drain = actions.add_parser("drain", help="take one instance out of service (scale-down): "
                               "its unfinished requests move to the others")
    drain.add_argument("instance_id", help='e.g. "decode-1" (see `pdserve admin state`)')
    drain.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="how long its requests may run on there before they move "
                            "(default: the server's supervision.drain_timeout_s)")
    for q in (state, drain):
        _add_connection_args(q, "file holding the admin token (default: $PDSERVE_ADMIN_TOKEN, "
                                "else $PDSERVE_AUTH_TOKEN, if set)")
        q.set_defaults(handler=_run_admin)


def _run_admin(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    reply = _rpc(_admin_call(args))
    print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=1))
    return 0


async def _admin_call(args: argparse.Namespace):
    import os

    from router.security import ADMIN_TOKEN_ENV, AUTH_TOKEN_ENV

    token_env = ADMIN_TOKEN_ENV if os.environ.get(ADMIN_TOKEN_ENV) else AUTH_TOKEN_ENV
    async with _connect(args, token_env) as client:
        if args.action == "drain":
            return await client.drain_instance(args.instance_id, args.timeout)
        return await client.cluster_state()
