"""`pdserve serve` and `pdserve client`: the serving layer's commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def add_parsers(sub) -> None:
    _add_serve_parser(sub)
    _add_client_parser(sub)


# ---- `pdserve serve` ------------------------------------------------------------------------------
def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the prefill/decode pools on Ray and the gRPC router")
    p.add_argument("--config", default=None, help="cluster config YAML (see deploy/pdserve.yaml)")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--prefill-instances", type=int, default=None)
    p.add_argument("--decode-instances", type=int, default=None)
    p.add_argument("--host", default=None,
                   help="interface the gRPC API (and, unless server.metrics_host is set, the "
                        "router's /metrics) listens on (default 127.0.0.1; 0.0.0.0 = every "
                        "interface)")
    p.add_argument("--grpc-port", type=int, default=None, help="default 50051")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="the router's Prometheus /metrics port (default 8000; 0 = any free port)")
    p.add_argument("--prometheus-sd-file", default=None, metavar="PATH",
                   help="Prometheus file_sd JSON listing every /metrics endpoint, kept current "
                        "(default /tmp/pdserve/prometheus_sd.json; '' = none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster to join: 'auto' (the one `ray start` runs on this node) "
                        "or host:port; default: $RAY_ADDRESS, else the config's ray_address "
                        "('local': a private Ray instance for this deployment)")
    p.add_argument("--name", default=None,
                   help="deployment name: Ray namespace and actor name prefix (default pdserve); "
                        "deployments sharing a Ray cluster need different names")
    p.add_argument("--worker-host", default=None,
                   help="address KV channels listen on (default: this node's IP in a Ray "
                        "cluster, 127.0.0.1 for a local one)")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import logging

    import ray

    from cluster.config import ClusterConfig, load_cluster_config, with_overrides
    from cluster.serve import serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_cluster_config(args.config) if args.config else ClusterConfig()
    config = with_overrides(config, model=args.model, prefill_instances=args.prefill_instances,
                            decode_instances=args.decode_instances, grpc_host=args.host,
                            grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port,
                            prometheus_sd_file=args.prometheus_sd_file, device=args.device)
    _sigterm_interrupts()
    config = _start_ray(config, args)
    host = args.worker_host or ("127.0.0.1" if _is_local_ray() else ray.util.get_node_ip_address())
    asyncio.run(serve_forever(config, host))
    return 0


def _start_ray(config, args: argparse.Namespace):
    """Start or join Ray (cluster/ray_runtime.py); the config returned records the address."""
    from cluster.capacity import check_capacity
    from cluster.config import with_overrides
    from cluster.placement import check_name_free
    from cluster.ray_runtime import init_ray, resolve_ray_address
    from pdserve.cli import CliError

    address = resolve_ray_address(args.ray_address, config.ray_address)
    config = with_overrides(config, ray_address=address, name=args.name)
    try:
        runtime = init_ray(config.ray_address, config.name)
    except ConnectionError as exc:
        raise CliError(str(exc)) from None
    _sigterm_interrupts()  # again: Ray's driver leaves a SIGTERM handler that aborts
    where = "a private Ray instance" if runtime.private else f"the Ray cluster at {address}"
    print(f"pdserve: on {where} (GCS {runtime.gcs_address}, namespace {runtime.namespace})",
          flush=True)
    check_name_free(config.name)  # before the model loads: these fail in milliseconds
    check_capacity(config)
    return config


def _sigterm_interrupts() -> None:
    """Until serve_forever installs its drain handlers, SIGTERM stops the start as Ctrl-C does
    (KeyboardInterrupt, status 130), so that exit handlers still take a private Ray down.
    (While `ray.init` runs, Ray's own handler exits with status 15, as cleanly.)"""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _is_local_ray() -> bool:
    import ray

    return len(ray.nodes()) == 1


# ---- `pdserve client` -----------------------------------------------------------------------------
def _add_client_parser(sub) -> None:
    from router.client import DEFAULT_ADDRESS

    p = sub.add_parser("client", help="stream one completion from a running pdserve router")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="router host:port")
    p.add_argument("--chat", action="store_true", help="send it as one user chat message")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the server's (256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the server's (1.0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline for the whole call")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, usage, timing) at the end")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA file (implies --tls)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the bearer token (default: $PDSERVE_AUTH_TOKEN, if set)")
    p.set_defaults(handler=_run_client)


def _run_client(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.cli import CliError

    try:
        completion = asyncio.run(_stream_completion(args))
    except grpc.aio.AioRpcError as error:
        raise CliError(f"{error.code().name}: {error.details()}") from None
    if args.json:
        print(json.dumps(completion.to_json_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


async def _stream_completion(args: argparse.Namespace):
    from router.client import Completion, PdserveClient
    from router.security import AUTH_TOKEN_ENV, read_token

    inputs = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
              else {"prompt": args.prompt})
    completion = Completion()
    token = read_token(args.token_file or "", AUTH_TOKEN_ENV)
    async with PdserveClient(args.address, tls=args.tls, root_cert_file=args.tls_ca,
                             client_cert_file=args.tls_cert, client_key_file=args.tls_key,
                             token=token) as client:
        call = client.generate_stream(timeout_s=args.timeout, max_tokens=args.max_tokens,
                                      temperature=args.temperature, seed=args.seed, **inputs)
        async for response in call:
            completion.add(response)
            if not args.json:
                sys.stdout.write(response.text)
                sys.stdout.flush()
    return completion
