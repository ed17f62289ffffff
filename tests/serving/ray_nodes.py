"""A local multi-node Ray cluster (ray.cluster_utils.Cluster) owned by a spawned process.

Starting Ray's daemons forks the calling process. By the time these tests run, the pytest
process holds gRPC, torch and Ray threads from earlier tests, and on a 2-core CI machine a
raylet started from it sometimes never came up ("The current node timed out during startup").
A freshly spawned interpreter has none of that state: it starts the nodes, reports the address,
and shuts them down when told to (or when the test process dies: it is a daemon).
"""

from __future__ import annotations

import multiprocessing as mp
from contextlib import contextmanager

START_TIMEOUT_S = 180.0


def _own_cluster(conn, num_nodes: int, node_args: dict) -> None:
    from ray.cluster_utils import Cluster

    try:
        cluster = Cluster(initialize_head=True,
                          head_node_args={**node_args, "include_dashboard": False})
        for _ in range(num_nodes - 1):
            cluster.add_node(**node_args)
    except BaseException as exc:  # reported to the test, which fails with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", cluster.address))
    try:
        conn.recv()  # any message, or EOF when the test process is gone: stop
    except EOFError:
        pass
    cluster.shutdown()


@contextmanager
def local_cluster(num_nodes: int, **node_args):
    """Yields the address of a running `num_nodes`-node cluster; every node gets `node_args`."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_own_cluster, args=(child, num_nodes, node_args), daemon=True)
    proc.start()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise TimeoutError(f"a {num_nodes}-node Ray cluster did not start in "
                               f"{START_TIMEOUT_S:.0f} s")
        kind, value = parent.recv()
        if kind == "error":
            raise RuntimeError(f"could not start a {num_nodes}-node Ray cluster: {value}")
        yield value
    finally:
        if proc.is_alive():
            parent.send("stop")
            proc.join(60)
        if proc.is_alive():
            proc.kill()
