"""Hostile inputs against a real grpc.aio router (ColocatedBackend, default model, 127.0.0.1):
each gets INVALID_ARGUMENT naming the field within a second, counted in the router's metrics;
internal failures reach the client as a code and an error id only; a call without a deadline
gets the server's. Every scenario ends with the leak check.
"""

from __future__ import annotations

import logging
import math
import re
import time

import grpc
import pytest

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2
from router.colocated import ColocatedBackend
from router.validation import (MAX_REQUEST_ID_CHARS, MAX_STOP_BYTES, MAX_STOP_STRINGS,
                               PROMPT_BYTES_PER_TOKEN)
from router.wire import SERVICE
from tests.helpers import build_engine
from tests.serving.test_router import LONG_RUN, RouterHarness, rpc_error

pytestmark = pytest.mark.timeout(120)

GENERATE = f"/{SERVICE.full_name}/Generate"
ABORT = f"/{SERVICE.full_name}/Abort"
SECRET = "/home/alice/.ssh/id_rsa token=hunter2"  # what a leaked error text would look like
CONTEXT_LENGTH = 8192  # the default model's


@pytest.fixture(scope="module")
def router(default_loaded):
    harness = RouterHarness(build_engine(default_loaded, num_blocks=128), max_queued_requests=8)
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def leak_check(router):
    yield
    router.wait_until_idle()


def invalid_argument(router: RouterHarness, **kwargs) -> str:
    """The details of a Generate call that must fail with INVALID_ARGUMENT within a second."""
    start = time.monotonic()
    error = rpc_error(router, router.client.generate(**kwargs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert time.monotonic() - start < 1.0
    return error.details()


def count(router: RouterHarness, name: str, **labels: str) -> float:
    registry = router.server.metrics.registry
    model = router.backend.model_info().model_name
    value = registry.get_sample_value(f"pdserve:{name}_total", {"model_name": model, **labels})
    return value or 0.0


# ---- stop strings -----------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [
    ["x"] * (MAX_STOP_STRINGS + 1),
    ["y" * (MAX_STOP_BYTES + 1)],
    ["é" * (MAX_STOP_BYTES // 2 + 1)],  # counted in UTF-8 bytes, not characters
    ["z" * (1 << 20)],  # the 1 MiB stop string that exhausted a node's memory
])
def test_stop_strings_beyond_the_bounds_are_refused(router, stop):
    details = invalid_argument(router, prompt="hi", stop=stop, max_tokens=1)
    assert details.startswith("sampling.stop:")


def test_stop_strings_at_the_bounds_are_served(router):
    stop = ["s" * (MAX_STOP_BYTES // MAX_STOP_STRINGS - 1) + chr(ord("a") + i)
            for i in range(MAX_STOP_STRINGS)]
    done = router.run(router.client.generate("hi", stop=stop, max_tokens=2))
    assert done.finish_reason in ("stop", "length")


# ---- bytes that are not a valid GenerateRequest -------------------------------------------------
def _with_invalid_utf8(request: generation_pb2.GenerateRequest, marker: bytes) -> bytes:
    wire = request.SerializeToString()
    assert wire.count(marker) == 1
    return wire.replace(marker, b"\xc3\x28")  # a lead byte without its continuation


def _chat(content: str) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest()
    request.messages.messages.add(role="user", content=content)
    return request


@pytest.mark.parametrize("wire, field", [
    (_with_invalid_utf8(generation_pb2.GenerateRequest(prompt="QQ"), b"QQ"), "prompt:"),
    (_with_invalid_utf8(generation_pb2.GenerateRequest(
        prompt="hi", sampling=generation_pb2.SamplingParams(stop=["ok", "QQ"])), b"QQ"),
     "sampling.stop[1]:"),
    (_with_invalid_utf8(_chat("QQ"), b"QQ"), "messages[0].content:"),
    (_with_invalid_utf8(generation_pb2.GenerateRequest(request_id="QQ", prompt="hi"), b"QQ"),
     "request_id:"),
    (b"\xff\xff\xff\xff\x0f not protobuf at all", "request: is not a valid GenerateRequest"),
])
def test_undecodable_requests_are_invalid_argument_naming_the_field_and_counted(router, wire,
                                                                              field):
    before = count(router, "router_requests", transport="grpc", code="INVALID_ARGUMENT")
    before_errors = count(router, "router_request_errors", transport="grpc",
                                  error_type="invalid_request")

    async def send_raw():
        channel = grpc.aio.insecure_channel(router.address)
        try:
            call = channel.unary_stream(GENERATE)  # no serializers: the bytes go out as they are
            return [response async for response in call(wire, timeout=10)]
        finally:
            await channel.close()

    error = rpc_error(router, send_raw())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field), error.details()
    assert count(router, "router_requests", transport="grpc", code="INVALID_ARGUMENT") == before + 1
    assert count(router, "router_request_errors", transport="grpc",
                                  error_type="invalid_request") == before_errors + 1


def test_an_undecodable_abort_is_invalid_argument(router):
    async def send_raw():
        async with grpc.aio.insecure_channel(router.address) as channel:
            return await channel.unary_unary(ABORT)(b"\x0a\x02\xc3\x28", timeout=10)

    error = rpc_error(router, send_raw())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request_id:")


# ---- request ids, chat roles, sampling values ----------------------------------------------------
@pytest.mark.parametrize("request_id", [
    "r" * (MAX_REQUEST_ID_CHARS + 1), "x" * (1 << 20), "has space", "new\nline", "ünï", "a/b",
])
def test_bad_request_ids_are_refused(router, request_id):
    assert invalid_argument(router, prompt="hi", request_id=request_id).startswith("request_id:")


def test_the_longest_allowed_request_id_is_echoed(router):
    request_id = ("Az09._:-" * 16)[:MAX_REQUEST_ID_CHARS]
    done = router.run(router.client.generate("hi", request_id=request_id, max_tokens=1))
    assert done.request_id == request_id


@pytest.mark.parametrize("role", ["hacker", "", "tool", "User"])
def test_unknown_chat_roles_are_refused_listing_the_allowed_ones(router, role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "hi"}]
    details = invalid_argument(router, messages=messages)
    assert details.startswith("messages[1].role:")
    assert "system, user, assistant" in details


def _engine_rejects_non_finite() -> bool:
    try:
        SamplingParams(temperature=math.inf)
    except ValueError:
        return True
    return False


@pytest.mark.skipif(not _engine_rejects_non_finite(),
                    reason="engine/sampling_params.py does not reject non-finite values yet")
@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "top_p", "min_p"])
def test_non_finite_sampling_values_are_invalid_argument(router, name):
    details = invalid_argument(router, prompt="hi", **{name: math.inf})
    assert details.startswith(f"sampling.{name}:")


# ---- text bounded before tokenizing --------------------------------------------------------------
def test_a_4_mb_prompt_is_refused_before_tokenizing(router):
    details = invalid_argument(router, prompt="word " * 800_000)  # tokenizing it takes seconds
    assert details.startswith("prompt:")
    assert str(PROMPT_BYTES_PER_TOKEN * CONTEXT_LENGTH) in details


def test_message_contents_are_bounded_in_total(router):
    half = "a" * (PROMPT_BYTES_PER_TOKEN * CONTEXT_LENGTH // 2 + 1)
    details = invalid_argument(router, messages=[{"role": "system", "content": half},
                                                 {"role": "user", "content": half}])
    assert details.startswith("messages:")


def test_a_prompt_within_the_byte_bound_is_still_checked_in_tokens(router):
    details = invalid_argument(router, prompt="word " * 9000)  # 45 kB, over 8192 tokens
    assert details.startswith("prompt:") and "context length" in details


@pytest.mark.parametrize("instance_id, timeout_s, field", [
    ("", None, "instance_id"), ("x" * 129, None, "instance_id"), ("decode 0\n", None, "instance_id"),
    ("decode-0", float("nan"), "timeout_s"), ("decode-0", -1.0, "timeout_s"),
    ("decode-0", 1e9, "timeout_s"),
    ("decode-0", 5.0, "instance_id"),  # valid, but a colocated server has no pool to drain
])
def test_drain_instance_is_validated(router, instance_id, timeout_s, field):
    error = rpc_error(router, router.client.drain_instance(instance_id, timeout_s))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:"), error.details()


# ---- a backend that fails; the default deadline ------------------------------------------------
class FaultyBackend(ColocatedBackend):
    """Raises an exception with secret text from an RPC named in `failing` (others work)."""

    failing: frozenset[str] = frozenset()

    async def cluster_state(self):
        if "cluster_state" in self.failing:
            raise RuntimeError(f"out of memory; top users: {SECRET}")
        return await super().cluster_state()

    async def abort(self, request_id: str) -> bool:
        if "abort" in self.failing:
            raise OSError(f"cannot reach the worker: {SECRET}")
        return await super().abort(request_id)

    def model_info(self):
        if "model_info" in self.failing:
            raise KeyError(SECRET)
        return super().model_info()


@pytest.fixture(scope="module")
def faulty(default_loaded):
    harness = RouterHarness(build_engine(default_loaded, num_blocks=64), max_queued_requests=4,
                            backend_cls=FaultyBackend, request_timeout_s=1.0)
    yield harness
    harness.close()


@pytest.mark.parametrize("rpc, failing", [
    ("cluster_state", "cluster_state"), ("model_info", "model_info"),
])
def test_internal_error_text_never_reaches_the_client(faulty, caplog, rpc, failing):
    faulty.backend.failing = frozenset({failing})
    try:
        with caplog.at_level(logging.ERROR, logger="router.guard"):
            error = rpc_error(faulty, getattr(faulty.client, rpc)())
    finally:
        faulty.backend.failing = frozenset()
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in error.details() and "hunter2" not in error.details()
    (error_id,) = re.fullmatch(r"internal error \(id ([0-9a-f]+)\)", error.details()).groups()
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])  # the traceback went to the log
    faulty.wait_until_idle()


def test_a_failing_abort_is_internal_without_its_text(faulty):
    async def scenario():
        call = faulty.client.generate_stream("Tell me a long story.", request_id="victim",
                                             timeout_s=30, **LONG_RUN)
        await call.read()
        faulty.backend.failing = frozenset({"abort"})
        try:
            return await faulty.client.abort("victim")
        finally:
            faulty.backend.failing = frozenset()
            call.cancel()

    error = rpc_error(faulty, scenario())
    assert error.code() == grpc.StatusCode.INTERNAL and "hunter2" not in error.details()
    faulty.wait_until_idle()


def test_a_call_without_a_deadline_gets_the_servers_and_is_aborted(faulty):
    start = time.monotonic()
    error = rpc_error(faulty, faulty.client.generate("Tell me a long story.", **LONG_RUN))
    elapsed_s = time.monotonic() - start
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < elapsed_s < 5.0, elapsed_s
    _a_normal_request_succeeds_then_idle(faulty)  # the request was aborted on the backend


def test_a_client_deadline_still_wins_over_the_servers(faulty):
    start = time.monotonic()
    error = rpc_error(faulty, faulty.client.generate("Tell me a long story.", timeout_s=0.3,
                                                     **LONG_RUN))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 0.9
    _a_normal_request_succeeds_then_idle(faulty)


def _a_normal_request_succeeds_then_idle(harness: RouterHarness) -> None:
    """A request after the aborted one: the engine applies the abort first, and its snapshot
    for the leak check is taken after both (a call that ended before its first token may
    otherwise be checked against a snapshot from before it was added)."""
    done = harness.run(harness.client.generate("hi", max_tokens=1, timeout_s=30))
    assert done.finish_reason in ("stop", "length")
    harness.wait_until_idle(timeout_s=5.0)
