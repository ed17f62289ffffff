"""Streams that record every token with its arrival time, for the recovery tests: the same
requests are run once uninterrupted (the reference) and once with a fault, and compared token
for token."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

import grpc
import ray

from cluster.config import SupervisionConfig
from protos.pdserve.v1 import generation_pb2
from tests.serving.disagg_cluster import cluster_config

READY = generation_pb2.INSTANCE_STATUS_READY


@dataclass
class Stream:
    """What one client call received."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    arrivals_s: list[float] = field(default_factory=list)  # monotonic time of each message
    code: grpc.StatusCode | None = None
    details: str = ""
    finish_reason: str = ""
    progressed: asyncio.Event = field(default_factory=asyncio.Event)
    wait_for_tokens: int = 0  # `progressed` is set once this many tokens arrived

    @property
    def max_gap_s(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals_s, self.arrivals_s[1:])]
        return max(gaps, default=0.0)


def stream_kwargs(i: int, max_tokens: int) -> dict:
    """Request i: greedy, seeded top-p at temperature 0.8, and both with a repetition penalty
    (its state is the whole history, so a resumed request must rebuild it)."""
    sampling = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9),
                dict(temperature=0.0, repetition_penalty=1.3),
                dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2)][i % 4]
    return dict(prompt=f"Story number {i}: once upon a time", max_tokens=max_tokens,
                ignore_eos=True, seed=1000 + i, **sampling)


async def run_stream(client, stream: Stream, timeout_s: float | None = None,
                     **kwargs) -> Stream:
    call = client.generate_stream(request_id=stream.request_id, timeout_s=timeout_s, **kwargs)
    try:
        async for response in call:
            stream.token_ids += response.token_ids
            stream.arrivals_s.append(time.monotonic())
            if response.finish_reason:
                stream.finish_reason = response.finish_reason
            if len(stream.token_ids) >= stream.wait_for_tokens:
                stream.progressed.set()
        stream.code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        stream.code, stream.details = error.code(), error.details() or ""
    stream.progressed.set()
    return stream


def start_streams(cluster, tag: str, n: int, max_tokens: int, wait_for_tokens: int = 0,
                  timeout_s: float | None = None,
                  spacing_s: float = 0.0) -> tuple[list[Stream], list[asyncio.Future]]:
    """n concurrent streams (ids "<tag>-<i>"), started `spacing_s` apart."""
    streams = [Stream(f"{tag}-{i}", wait_for_tokens=wait_for_tokens) for i in range(n)]

    async def start():
        tasks = []
        for i, stream in enumerate(streams):
            tasks.append(asyncio.ensure_future(run_stream(
                cluster.client, stream, timeout_s, **stream_kwargs(i, max_tokens))))
            if spacing_s:
                await asyncio.sleep(spacing_s)
        return tasks
    return streams, cluster.run(start())


def gather(cluster, tasks, timeout_s: float) -> list[Stream]:
    async def wait():
        return await asyncio.gather(*tasks)
    return cluster.run(wait(), timeout_s=timeout_s)


def wait_progress(cluster, stream: Stream, timeout_s: float = 120.0) -> None:
    """Until `stream` has its `wait_for_tokens` tokens (or has ended)."""
    async def wait():
        await asyncio.wait_for(stream.progressed.wait(), timeout_s)
    cluster.run(wait(), timeout_s=timeout_s + 5)


def worker_pid(worker) -> int:
    return ray.get(worker.actor.__ray_call__.remote(lambda actor: os.getpid()), timeout=30)


def sigkill(worker) -> float:
    """SIGKILL an instance's worker process; returns the monotonic time of the kill."""
    os.kill(worker_pid(worker), signal.SIGKILL)
    return time.monotonic()


def states(cluster) -> dict[str, generation_pb2.InstanceState]:
    return {s.instance_id: s for s in cluster.run(cluster.client.cluster_state()).instances}


def wait_ready(cluster, instance_id: str, timeout_s: float) -> float:
    """Until `instance_id` is READY again; returns when (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = states(cluster).get(instance_id)
        if state is not None and state.status == READY:
            return time.monotonic()
        assert time.monotonic() < deadline, f"{instance_id} not READY after {timeout_s} s: {state}"
        time.sleep(0.1)


def sample(cluster, name: str, **labels) -> float:
    """A sample of the router's /metrics registry (0.0 when absent)."""
    labels = {"model_name": cluster.backend.model_name, **labels}
    value = cluster.server.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def assert_same_as_reference(streams: list[Stream], reference: list[Stream]) -> None:
    for got, want in zip(streams, reference, strict=True):
        assert got.code == grpc.StatusCode.OK, (got.request_id, got.code, got.details)
        assert got.finish_reason == want.finish_reason, got.request_id
        first_diff = next((k for k, (a, b) in enumerate(zip(got.token_ids, want.token_ids))
                           if a != b), None)
        assert got.token_ids == want.token_ids, (
            f"{got.request_id}: {len(got.token_ids)} tokens vs {len(want.token_ids)}, first "
            f"difference at {first_diff}")


def recovery_config(num_prefill: int, num_decode: int, max_num_seqs: int, **supervision):
    """A CPU cluster whose supervisor polls every 0.5 s (health deadline 5 s, watchdog 60 s);
    `supervision` overrides SupervisionConfig fields."""
    config = cluster_config(num_prefill, num_decode, num_blocks=256, transfer_timeout_s=10.0)
    watch = dict(poll_interval_s=0.5, health_timeout_s=5.0, step_timeout_s=60.0)
    return dataclasses.replace(
        config, decode=dataclasses.replace(config.decode, max_num_seqs=max_num_seqs),
        supervision=SupervisionConfig(**{**watch, **supervision}))


def run_reference(cluster, n: int, max_tokens: int) -> list[Stream]:
    """The uninterrupted run of the n requests every scenario repeats."""
    _, tasks = start_streams(cluster, "reference", n, max_tokens)
    streams = gather(cluster, tasks, timeout_s=300)
    assert all(len(s.token_ids) == max_tokens for s in streams), [s.code for s in streams]
    cluster.wait_until_idle(timeout_s=30)
    return streams
