"""Hostile input against the real cluster (issue 11): one 1 prefill + 1 decode CPU cluster on a
local Ray, driven through a real gRPC client. Each hostile request (tests/serving/
hostile_requests.py, shared with the soak) gets INVALID_ARGUMENT naming the field within
HOSTILE_DEADLINE_S; raw bytes that are not a valid request too. A burst past every bound (the
router's in-flight limit, then the decode queue, `decode.max_waiting_requests`) is partly
served and partly refused at once with RESOURCE_EXHAUSTED. Every test ends with every pool full
again; the last checks that a greedy request still gives the answer it gave first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from router.wire import SERVICE
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness
from tests.serving.hostile_requests import HOSTILE_CASES, HOSTILE_WIRE, HostileCase

pytestmark = pytest.mark.timeout(300)
GENERATE = f"/{SERVICE.full_name}/Generate"
HOSTILE_DEADLINE_S = 2.0  # a refusal costs no engine work: it must come back at once
MAX_QUEUED_REQUESTS = 8  # the router's in-flight bound
DECODE_MAX_WAITING = 2  # the decode queue bound: a reservation waits there until its KV lands,
#                         so of a burst's 8 admitted requests only 2 reserve at once
GREEDY = {"prompt": "Hello!", "max_tokens": 8, "temperature": 0.0}
C = grpc.StatusCode


@pytest.fixture(scope="module")
def cluster():
    config = cluster_config(1, 1, num_blocks=128)
    config = dataclasses.replace(
        config,
        decode=dataclasses.replace(config.decode, max_waiting_requests=DECODE_MAX_WAITING),
        server=dataclasses.replace(config.server, max_queued_requests=MAX_QUEUED_REQUESTS))
    with local_ray():
        harness = start_disagg_harness(config)
        # the answer before any hostile input, compared with the one after it all
        harness.greedy_before = harness.run(harness.client.generate(**GREEDY), timeout_s=60)
        yield harness
        harness.close()


@pytest.fixture(autouse=True)
def leak_check(cluster):
    yield
    cluster.wait_until_idle(timeout_s=30)


async def _outcome(call) -> tuple[C, str, float]:
    """(status, details, seconds until the call ended) of a Generate call, read to its end."""
    started = time.monotonic()
    try:
        async for _ in call:
            pass
        return C.OK, "", time.monotonic() - started
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", time.monotonic() - started


def _assert_invalid_argument(outcome: tuple[C, str, float], field: str) -> None:
    code, details, elapsed_s = outcome
    assert code == C.INVALID_ARGUMENT, (code, details[:200])
    assert details.startswith(field), details[:200]
    assert elapsed_s < HOSTILE_DEADLINE_S, elapsed_s


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda case: case.name)
def test_hostile_requests_are_invalid_argument_naming_the_field(cluster, case: HostileCase):
    request = dict(case.request)
    prompt = request.pop("prompt", None)

    async def send():  # the call is made on the harness's loop, as gRPC aio requires
        return await _outcome(cluster.client.generate_stream(prompt, timeout_s=30, max_tokens=4,
                                                             **request))

    _assert_invalid_argument(cluster.run(send()), case.field)


@pytest.mark.parametrize("wire, field", [(wire, field) for _, wire, field in HOSTILE_WIRE],
                         ids=[name for name, _, _ in HOSTILE_WIRE])
def test_undecodable_bytes_are_invalid_argument_naming_the_field(cluster, wire: bytes,
                                                                 field: str):
    async def send_raw():
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            call = channel.unary_stream(GENERATE)  # no serializers: the bytes go out as they are
            return await _outcome(call(wire, timeout=30))

    _assert_invalid_argument(cluster.run(send_raw()), field)


def test_a_burst_past_the_bounds_is_partly_served_and_the_rest_refused_at_once(cluster):
    """3 x max_queued_requests at once: the router admits 8, the decode instance reserves for
    its queue's 2 of them; every other request gets RESOURCE_EXHAUSTED without waiting. A
    decode refusal frees its router slot within milliseconds, so which bound refuses a given
    request is a race: bursts repeat (at most 4) until each bound has refused at least one."""
    async def burst():
        calls = [cluster.client.generate_stream(f"Count to {i}:", max_tokens=4, temperature=0.0,
                                                timeout_s=60)
                 for i in range(3 * MAX_QUEUED_REQUESTS)]
        return await asyncio.gather(*(_outcome(call) for call in calls))

    refused: list[tuple[str, float]] = []
    for _ in range(4):
        outcomes = cluster.run(burst(), timeout_s=120)
        codes = [code for code, _, _ in outcomes]
        assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED}, outcomes
        assert C.OK in codes, codes
        refused += [(details, elapsed_s) for code, details, elapsed_s in outcomes
                    if code == C.RESOURCE_EXHAUSTED]
        if (any("in flight" in details for details, _ in refused)
                and any("decode queue full" in details for details, _ in refused)):
            break
    # both bounds refused some: the router's, and the decode queue the config set
    assert any("in flight" in details for details, _ in refused), refused
    assert any(f"decode queue full: {DECODE_MAX_WAITING} requests waiting" in details
               for details, _ in refused), refused
    assert max(elapsed_s for _, elapsed_s in refused) < HOSTILE_DEADLINE_S, refused


def test_afterwards_every_pool_is_full_and_greedy_answers_as_before(cluster):
    instances = cluster.wait_until_idle(timeout_s=30)
    assert {s.instance_id for s in instances} == {"prefill-0", "decode-0"}
    done = cluster.run(cluster.client.generate(**GREEDY), timeout_s=60)
    assert done.finish_reason in ("stop", "length") and done.token_ids
    assert done.token_ids == cluster.greedy_before.token_ids
