"""The disaggregated cluster, 1 prefill + 1 decode on a local Ray, over real gRPC and Gloo:
outputs equal to colocated, cancellation, deadlines, injected transfer faults, overload, bad
requests and a missing decode pool — each scenario ends with every KV pool full again."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import ray

from cluster.disagg_backend import DisaggregatedBackend
from cluster.pools import Pools
from kv_transfer import FaultInjection
from tests.helpers import build_engine
from tests.serving.disagg_cluster import (
    GREEDY_16,
    MAX_INFLIGHT,
    assert_equal_or_near_tie,
    cluster_config,
    local_ray,
    start_disagg_harness,
    token_prompts,
)
from tests.serving.harness import ServerHarness
from tests.serving.recovery_helpers import sample

pytestmark = pytest.mark.timeout(300)
LONG_RUN = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        # the decode engine schedules asynchronously, as on GPUs: its in-flight steps and
        # deferred block frees go through every cancel / deadline / fault scenario below
        harness = start_disagg_harness(cluster_config(1, 1, transfer_timeout_s=4.0,
                                                      async_decode=True))
        yield harness
        harness.close()


@pytest.fixture(scope="module")
def reference(default_loaded):
    engine = build_engine(default_loaded)
    prompts = token_prompts(default_loaded.tokenizer)
    return engine, prompts, engine.generate(prompts, GREEDY_16)


def test_16_concurrent_streams_equal_colocated(cluster, reference):
    engine, prompts, expected = reference
    assert len(prompts) == 16

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=16, temperature=0.0) for p in prompts))

    completions = cluster.run(run_all(), timeout_s=240)
    for prompt, got, want in zip(prompts, completions, expected):
        assert_equal_or_near_tie(engine, prompt, got.token_ids, want.token_ids)
        assert got.text == want.text and got.finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(prompt)
        assert got.usage.completion_tokens == len(got.token_ids)
        assert got.timing.ttft_s > 0 and got.timing.e2e_s >= got.timing.ttft_s
    assert cluster.backend.pools.decode[0].spec.engine.use_async_scheduling
    cluster.wait_until_idle()


def test_cancel_mid_stream_frees_every_block(cluster):
    async def cancel_after_tokens():
        call = cluster.client.generate_stream("Tell me a long story.", **LONG_RUN)
        received = 0
        async for response in call:
            received += len(response.token_ids)
            if received >= 3:
                call.cancel()
                break
        return received

    assert cluster.run(cancel_after_tokens()) >= 3
    cluster.wait_until_idle()


def test_deadline_expiry_aborts_everywhere(cluster):
    async def with_deadline():
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cluster.client.generate("Count to a thousand.", timeout_s=1.5, **LONG_RUN)
        return info.value.code(), time.monotonic() - started

    code, elapsed = cluster.run(with_deadline())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 10
    cluster.wait_until_idle()


def test_abort_rpc_ends_stream(cluster):
    async def abort_running():
        call = cluster.client.generate_stream("Tell me a story.", request_id="to-abort", **LONG_RUN)
        reasons = []
        async for response in call:
            if not reasons:
                assert await cluster.client.abort("to-abort")
            reasons.append(response.finish_reason)
        return reasons[-1]

    assert cluster.run(abort_running()) == "abort"
    cluster.wait_until_idle()


def _migrations_by_transfer(cluster) -> float:
    return sample(cluster, "pdserve:request_migrations_total", cause="transfer")


def test_a_fault_of_one_channel_generation_is_healed_by_moving_the_request(cluster):
    """The pair's current channel drops every transfer (the rebuilt one does not): the request
    moves, waits for the rebuild, and its client gets the answer it would have got anyway."""
    want = cluster.run(cluster.client.generate("Hello there!", max_tokens=8, temperature=0.0))
    cluster.wait_until_idle()
    moved_before = _migrations_by_transfer(cluster)
    prefill = cluster.backend.pools.prefill[0].actor
    ray.get(prefill.set_faults.remote(FaultInjection(drop_after_layers=5)))  # this generation
    got = cluster.run(cluster.client.generate("Hello there!", max_tokens=8, temperature=0.0))
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert _migrations_by_transfer(cluster) == moved_before + 1
    cluster.wait_until_idle()


def test_a_persistent_transfer_fault_fails_cleanly_once_its_moves_are_used_up(cluster):
    prefill = cluster.backend.pools.prefill[0].actor
    ray.get(prefill.set_faults.remote(FaultInjection(drop_after_layers=5), True))  # every link
    moved_before = _migrations_by_transfer(cluster)

    async def failing():
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cluster.client.generate("Hello there!", max_tokens=8, temperature=0.0)
        return info.value, time.monotonic() - started

    try:
        error, elapsed = cluster.run(failing(), timeout_s=120)
    finally:
        ray.get(prefill.set_faults.remote(FaultInjection(), True))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    # the worker's own text stays in the server log; the client gets a retry hint and an id
    assert "retry" in error.details() and "error id" in error.details(), error.details()
    max_migrations = cluster.backend.config.max_migrations
    assert _migrations_by_transfer(cluster) == moved_before + max_migrations
    # each attempt ends at the transfer timeout (4 s), then waits for its channel's rebuild
    assert elapsed < (max_migrations + 1) * (4.0 + 3.0) + 5.0, elapsed
    cluster.wait_until_idle()
    # The faults are gone and the pair is rebuilt under a new generation: requests succeed.
    deadline = time.monotonic() + 30
    while True:
        try:
            done = cluster.run(cluster.client.generate("Hi!", max_tokens=4, temperature=0.0))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.5)
    assert done.finish_reason in ("stop", "length")
    cluster.wait_until_idle()


def test_bad_requests_are_invalid_argument(cluster):
    async def call(**kwargs):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cluster.client.generate(**kwargs)
        return info.value

    for kwargs, field in [({"prompt": ""}, "prompt"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                          ({"prompt": "x", "top_p": 2.0}, "top_p"), ({}, "input"),
                          ({"prompt_token_ids": [10 ** 6]}, "prompt_token_ids")]:
        error = cluster.run(call(**kwargs))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert field in error.details()
    # more tokens than a decode instance's whole KV pool (256 blocks of 16): it can never be
    # served, so it is invalid (not overload, which invites a retry) and names the bound
    error = cluster.run(call(prompt="x", max_tokens=5000, ignore_eos=True))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pool has only 256" in error.details() and "max_tokens" in error.details()
    cluster.wait_until_idle()


def test_flood_beyond_bound_is_resource_exhausted_fast(cluster):
    async def flood():
        calls = [cluster.client.generate_stream("Keep talking.", **LONG_RUN)
                 for _ in range(MAX_INFLIGHT + 16)]
        codes = []

        async def first_message(call):
            try:
                async for _ in call:
                    return "ok"
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        started = time.monotonic()
        codes = await asyncio.wait_for(asyncio.gather(*(first_message(c) for c in calls)), 120)
        for c in calls:
            c.cancel()
        return codes, time.monotonic() - started

    codes, _ = cluster.run(flood(), timeout_s=150)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 16
    assert "ok" in codes
    cluster.wait_until_idle(timeout_s=60)


def test_no_decode_instance_is_unavailable(cluster):
    backend = cluster.backend
    no_decode = DisaggregatedBackend(Pools(prefill=backend.pools.prefill, decode=[]),
                                     backend.tokenizer, backend.model_config)
    harness = ServerHarness(no_decode)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            harness.run(harness.client.generate("Hello", max_tokens=4))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not no_decode.is_ready()  # health NOT_SERVING: a pool has no live instance
        assert "not ready" in info.value.details()
    finally:
        harness.close(stop_backend=False)
