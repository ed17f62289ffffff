"""Faults against a real 1 prefill + 2 decode cluster on a local Ray (issue 11): cancels at
random moments, a burst over every bound, a wedged decode engine, a crashed prefill engine and
a SIGKILLed decode process. Each scenario checks the clients' statuses and their latency, the
instances' lifecycle status, health, and that every live pool is full again.

The scenarios run in file order on one cluster and the later ones kill instances: decode-1 is
wedged, then prefill-0 crashes, then decode-0 is killed. Recovery is off here (no replacement,
no migration): these check containment alone; tests/serving/test_recovery.py checks recovery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import SupervisionConfig
from protos.pdserve.v1 import generation_pb2
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = pytest.mark.timeout(300)
LONG_RUN = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}
DECODE_MAX_NUM_SEQS = 8
STEP_WATCHDOG_S = 15.0  # well above a 512-token CPU prefill step on a loaded 2-core machine
DEAD = generation_pb2.INSTANCE_STATUS_DEAD


@pytest.fixture(scope="module")
def cluster():
    config = cluster_config(1, 2, num_blocks=256, transfer_timeout_s=4.0)
    config = dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, max_num_batched_tokens=512),
        decode=dataclasses.replace(config.decode, max_num_seqs=DECODE_MAX_NUM_SEQS),
        server=dataclasses.replace(config.server, max_queued_requests=512),
        supervision=SupervisionConfig(poll_interval_s=0.5, health_timeout_s=5.0,
                                      step_timeout_s=STEP_WATCHDOG_S,
                                      replace_dead=False, max_migrations=0))
    with local_ray():
        harness = start_disagg_harness(config)
        yield harness
        harness.close()


def _status_of(cluster, instance_id: str) -> generation_pb2.InstanceState:
    states = cluster.run(cluster.client.cluster_state()).instances
    return next(s for s in states if s.instance_id == instance_id)


def _wait_status(cluster, instance_id: str, status: int, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while (state := _status_of(cluster, instance_id)).status != status:
        assert time.monotonic() < deadline, f"{instance_id} still {state}"
        time.sleep(0.2)
    return state


def _health(cluster) -> int:
    async def check():
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return (await stub.Check(health_pb2.HealthCheckRequest(service=""))).status
    return cluster.run(check())


def _wait_health(cluster, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(cluster) != status:
        assert time.monotonic() < deadline, f"health is not {status} after {timeout_s} s"
        time.sleep(0.2)


def _normal_request_succeeds(cluster) -> None:
    done = cluster.run(cluster.client.generate("Hello!", max_tokens=4, temperature=0.0),
                       timeout_s=60)
    assert done.finish_reason in ("length", "stop") and done.token_ids


async def _outcome(call) -> tuple[grpc.StatusCode, float, int]:
    """(status, seconds until the call ended, tokens received)."""
    started, received = time.monotonic(), 0
    try:
        async for response in call:
            received += len(response.token_ids)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
    except asyncio.CancelledError:  # a call this test cancelled raises CancelledError
        if not call.cancelled():
            raise
        code = grpc.StatusCode.CANCELLED
    return code, time.monotonic() - started, received


def test_cancels_at_random_moments_free_every_reservation(cluster):
    rng = random.Random(11)

    async def cancel_later(i: int) -> None:
        call = cluster.client.generate_stream("Tell me a story about a cat.", **LONG_RUN)
        await asyncio.sleep(rng.uniform(0.0, 0.6))  # many before the first token, some after
        call.cancel()
        await _outcome(call)

    async def run_all() -> None:
        for wave in range(5):
            await asyncio.gather(*(cancel_later(10 * wave + i) for i in range(10)))

    cluster.run(run_all(), timeout_s=240)
    cluster.wait_until_idle(timeout_s=30)
    _normal_request_succeeds(cluster)


def test_burst_over_every_bound_is_shed_at_once(cluster):
    """300 concurrent requests against 2 decode instances of max_num_seqs 8: each completes or
    gets RESOURCE_EXHAUSTED quickly; nothing crashes, nothing leaks."""
    async def one(i: int):
        call = cluster.client.generate_stream(f"Count: {i}", max_tokens=4, temperature=0.0)
        return await _outcome(call)

    async def burst():
        return await asyncio.gather(*(one(i) for i in range(300)))

    outcomes = cluster.run(burst(), timeout_s=280)
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= 2 * DECODE_MAX_NUM_SEQS
    shed = [elapsed for code, elapsed, _ in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert not shed or max(shed) < 30, max(shed)  # refused while the burst runs, never a hang
    assert all(_status_of(cluster, d).status != DEAD for d in ("decode-0", "decode-1"))
    cluster.wait_until_idle(timeout_s=60)
    _normal_request_succeeds(cluster)


def _start_streams(cluster, n: int) -> list[asyncio.Future]:
    """n long streams, started 0.3 s apart so that the router spreads them by free blocks."""
    async def start():
        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(_outcome(cluster.client.generate_stream(
                f"Story number {i}:", **LONG_RUN))))
            await asyncio.sleep(0.3)
        return tasks
    return cluster.run(start())


def _gather(cluster, tasks, timeout_s: float):
    async def wait():
        return await asyncio.gather(*tasks)
    return cluster.run(wait(), timeout_s=timeout_s)


def test_wedged_decode_engine_is_declared_dead_and_its_streams_end(cluster):
    streams = _start_streams(cluster, 6)
    time.sleep(2.0)  # both decode instances are streaming
    wedged = cluster.backend.pools.decode[1]
    ray.get(wedged.actor.inject_step_hang.remote(120.0))
    hung_at = time.monotonic()
    state = _wait_status(cluster, "decode-1", DEAD, timeout_s=STEP_WATCHDOG_S + 10)
    assert "wedged" in state.status_reason and time.monotonic() - hung_at < STEP_WATCHDOG_S + 10
    codes = cluster.run(_statuses_within(streams, 10.0))
    # decode-1's streams ended UNAVAILABLE; decode-0's still stream (None)
    assert grpc.StatusCode.UNAVAILABLE in codes and set(codes) <= {
        grpc.StatusCode.UNAVAILABLE, None}, codes
    assert _health(cluster) == health_pb2.HealthCheckResponse.SERVING  # decode-0 still serves
    _normal_request_succeeds(cluster)
    _cancel_all(cluster, streams)
    cluster.wait_until_idle(timeout_s=30)


async def _statuses_within(tasks: list[asyncio.Future], timeout_s: float):
    """Each stream's status if it ended within `timeout_s`, else None (still streaming)."""
    await asyncio.wait(tasks, timeout=timeout_s)
    return [task.result()[0] if task.done() else None for task in tasks]


def _cancel_all(cluster, tasks) -> None:
    async def cancel():
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cluster.run(cancel())


def test_crashed_prefill_then_killed_decode(cluster):
    """prefill-0's engine crashes: new requests fail fast, health turns NOT_SERVING, streams
    already decoding go on. Then decode-0's process is SIGKILLed: those streams end at once."""
    decoding = _start_streams(cluster, 2)
    time.sleep(2.0)  # both are past their prefill: they need only decode-0 now
    ray.get(cluster.backend.pools.prefill[0].actor.inject_step_failure.remote())
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        cluster.run(cluster.client.generate("Hello!", max_tokens=4, temperature=0.0),
                    timeout_s=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert time.monotonic() - started < 5.0
    assert _wait_status(cluster, "prefill-0", DEAD, timeout_s=5).status_reason == "engine failed"
    _wait_health(cluster, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        cluster.run(cluster.client.generate("Hello!", max_tokens=4), timeout_s=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 2
    assert not any(task.done() for task in decoding)  # decoding needs no prefill instance

    decode = cluster.backend.pools.decode[0]
    pid = ray.get(decode.actor.__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    outcomes = _gather(cluster, decoding, timeout_s=30)
    assert [code for code, _, _ in outcomes] == [grpc.StatusCode.UNAVAILABLE] * 2, outcomes
    assert time.monotonic() - killed_at < 10
    assert all(received > 0 for _, _, received in outcomes)  # they were streaming
    assert _wait_status(cluster, "decode-0", DEAD, timeout_s=5).status_reason == "process died"
