"""`pdserve serve`: start the pools on Ray and the router, serve until SIGTERM (then drain)."""

from __future__ import annotations

import argparse
import asyncio


def add_parsers(sub) -> None:
    _add_serve_parser(sub)


# ---- `pdserve serve` ------------------------------------------------------------------------------
def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the prefill/decode pools on Ray and the router "
                                           "(gRPC; OpenAI-compatible HTTP with --http-port)")
    p.add_argument("--config", default=None, help="cluster config YAML (see deploy/pdserve.yaml)")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--prefill-instances", type=int, default=None)
    p.add_argument("--decode-instances", type=int, default=None)
    p.add_argument("--host", default=None,
                   help="interface the gRPC API (and, unless server.metrics_host is set, the "
                        "router's /metrics) listens on (default 127.0.0.1; 0.0.0.0 = every "
                        "interface)")
    p.add_argument("--grpc-port", type=int, default=None, help="default 50051")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /health) on this port (0 = any free "
                        "port; default: off)")
    p.add_argument("--http-host", default=None,
                   help="interface the HTTP API listens on (default: the same as --host)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="the router's Prometheus /metrics port (default 8000; 0 = any free port)")
    p.add_argument("--prometheus-sd-file", default=None, metavar="PATH",
                   help="Prometheus file_sd JSON listing every /metrics endpoint, kept current "
                        "(default /tmp/pdserve/prometheus_sd.json; '' = none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const",
                   const=False, default=None,
                   help="turn prefix caching off in both pools (config: <pool>.prefix_caching)")
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
                            metrics_port=args.metrics_port, http_port=args.http_port,
                            http_host=args.http_host,
                            prometheus_sd_file=args.prometheus_sd_file, device=args.device,
                            prefix_caching=args.prefix_caching)
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
