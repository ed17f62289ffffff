"""Ray startup for `pdserve serve`: a private Ray instance, or an explicitly named cluster.

Which Ray a deployment uses, first match wins:

    --ray-address flag  >  RAY_ADDRESS environment variable  >  ray_address in the config

and the config's default is "local": a private single-node Ray that this process starts and
that ends with it. `ray.init(address="local")` never attaches to a running cluster (not to
RAY_ADDRESS, not to /tmp/ray/ray_current_cluster, which `ray start` writes), so two
`pdserve serve` on one host no longer share one Ray and compete for its placement groups.
Joining a running cluster is always explicit: "auto" (the one `ray start` runs on this node),
or host:port of its GCS.

Either way the driver runs in the Ray namespace named by the config's `name`, and actors and
placement groups carry that name as their prefix (cluster/placement.py refuses to start a
second deployment of the same name on one cluster).

A private instance listens on loopback only. Ray binds its servers to the node's IP, which it
takes from the host's outbound interface unless Ray runs in its single-machine mode (its
default on macOS and Windows, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): then the node
IP is 127.0.0.1 and so is every listener (docs/SECURITY.md lists them). Ray reads that switch
when it is imported, so for this process it is set on Ray's constants as well as in the
environment that the processes Ray starts inherit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray._private import ray_constants

LOCAL = "local"  # ray_address of a private instance
RAY_ADDRESS_ENV = "RAY_ADDRESS"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node IP 127.0.0.1

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RayRuntime:
    """The Ray this process is connected to."""

    private: bool  # started here by init_ray: one node, loopback only, ends with this process
    gcs_address: str  # host:port of its GCS
    namespace: str


def resolve_ray_address(flag: str | None, config_address: str,
                        environ: dict[str, str] | None = None) -> str:
    """The address to use: the flag, else RAY_ADDRESS, else the config's (see the docstring)."""
    environ = os.environ if environ is None else environ
    for address in (flag, environ.get(RAY_ADDRESS_ENV)):
        if address:
            return address
    return config_address


def init_ray(address: str, namespace: str) -> RayRuntime:
    """Start a private Ray ("local") or join the cluster at `address`, in `namespace`.

    A process already connected (tests start their own Ray) keeps its connection.
    """
    private = False
    if not ray.is_initialized():
        if address == LOCAL:
            _start_private(namespace)
            private = True
        else:
            _join(address, namespace)
    context = ray.get_runtime_context()
    return RayRuntime(private, context.gcs_address, context.namespace)


def _start_private(namespace: str) -> None:
    os.environ[SINGLE_MACHINE_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already
    log.info("starting a private Ray instance (namespace %s, loopback only)", namespace)
    ray.init(address=LOCAL, namespace=namespace, include_dashboard=False,
             logging_level=logging.WARNING)


def _join(address: str, namespace: str) -> None:
    try:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ConnectionError(
            f"no Ray cluster at ray_address {address!r}: start it first (`ray start --head`), "
            f'or leave ray_address at "local" for a private Ray instance ({exc})'
        ) from None
