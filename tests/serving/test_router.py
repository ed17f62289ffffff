"""The router over gRPC, end to end: a real grpc.aio server with a ColocatedBackend over the
session's default model, on an event loop in a background thread.

Every scenario ends with the leak check: the backend's reported KV pool and the engine's own
are full again and no request is left in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2
from router.backend import GenerationInput
from router.colocated import ColocatedBackend
from router.client import PdserveClient
from router.server import SERVICE_NAME, start_router
from tests.helpers import PROMPTS, build_engine, chat_ids
from tests.serving.harness import ServerHarness

pytestmark = pytest.mark.timeout(120)  # the first test's setup loads the model

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_QUEUED_REQUESTS = 24
SHORT_PROMPTS = [p for p in PROMPTS if len(p) < 100]
LONG_RUN = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0.0}  # never finishes in a test


class RouterHarness(ServerHarness):
    """The shared router harness over a ColocatedBackend, with the engine-side leak check.

    `router_options` go to `start_router` (request_timeout_s, security, ...), `client_options`
    to the harness's `PdserveClient` (TLS files, token).
    """

    def __init__(self, engine, max_queued_requests: int, backend_cls=ColocatedBackend,
                 client_options: dict | None = None, **router_options) -> None:
        self.engine = engine
        self._start_loop()
        self.backend = backend_cls(engine, max_queued_requests)
        self.server = self.run(start_router(self.backend, "127.0.0.1", 0, **router_options),
                               timeout_s=120)
        self.client = self.connect(**(client_options or {}))

    def connect(self, **client_options) -> PdserveClient:
        """A new client of this router (close it with `run(client.close())`)."""
        return self.run(_new_client(self.address, client_options))

    def wait_until_idle(self, timeout_s: float = 10.0) -> None:
        """Leak check: every KV block free and no request left, both as reported and in the engine."""
        (state,) = super().wait_until_idle(timeout_s)
        kv = self.engine.kv_manager
        assert kv.is_idle() and kv.num_free_blocks == kv.num_blocks == state.total_kv_blocks
        assert not self.engine.requests and not self.engine.scheduler.has_unfinished()


async def _new_client(address: str, client_options: dict) -> PdserveClient:
    return PdserveClient(address, **client_options)  # an aio channel lives on the loop that made it


@pytest.fixture(scope="module")
def router(default_loaded):
    harness = RouterHarness(build_engine(default_loaded, num_blocks=256), MAX_QUEUED_REQUESTS)
    yield harness
    harness.close()
    assert not harness.backend.is_ready()


@pytest.fixture(autouse=True)
def leak_check(router):
    yield
    router.wait_until_idle()


@pytest.fixture(scope="module")
def greedy_reference(make_engine):
    """Offline greedy completions of SHORT_PROMPTS from a separate engine: what gRPC must match."""
    engine = make_engine(num_blocks=64)
    num_threads = torch.get_num_threads()
    # A batch of five short prompts gains nothing from intra-op threads, and on a busy shared CPU
    # the main thread's spinning OpenMP team makes this step ~10x slower.
    torch.set_num_threads(1)
    try:
        outputs = engine.generate(SHORT_PROMPTS, SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        torch.set_num_threads(num_threads)
    return {prompt: out for prompt, out in zip(SHORT_PROMPTS, outputs)}


def rpc_error(router: RouterHarness, coro: Coroutine) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        router.run(coro)
    return info.value


# ---- generation -------------------------------------------------------------------------------
def test_sixteen_greedy_streams_match_engine_generate(router, greedy_reference):
    prompts = [SHORT_PROMPTS[i % len(SHORT_PROMPTS)] for i in range(16)]

    async def all_streams():
        return await asyncio.gather(*(router.client.generate(p, max_tokens=6, temperature=0.0)
                                      for p in prompts))

    for prompt, got in zip(prompts, router.run(all_streams())):
        want = greedy_reference[prompt]
        assert got.token_ids == want.token_ids, prompt
        assert got.text == want.text  # the text deltas concatenate to the full text
        assert got.finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.token_ids)
        assert 0 < got.timing.ttft_s <= got.timing.e2e_s


def test_prompt_token_ids_input_matches_the_text_prompt(router, greedy_reference):
    want = greedy_reference[SHORT_PROMPTS[0]]
    got = router.run(router.client.generate(prompt_token_ids=want.prompt_token_ids, max_tokens=6,
                                            temperature=0.0))
    assert got.token_ids == want.token_ids and got.text == want.text


def test_chat_messages_use_the_chat_template(router):
    question = "What is the capital of France?"
    got = router.run(router.client.generate(messages=[{"role": "user", "content": question}],
                                            max_tokens=8, temperature=0.0, logprobs=True))
    assert got.usage.prompt_tokens == len(chat_ids(router.engine.tokenizer, question))
    assert "Paris" in got.text
    assert len(got.logprobs) == len(got.token_ids) and all(lp <= 0.0 for lp in got.logprobs)


# ---- bad requests -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({}, "input: one of prompt, messages or prompt_token_ids is required"),
    ({"prompt": ""}, "prompt:"),
    ({"messages": []}, "messages:"),
    ({"prompt": "hi", "max_tokens": 0}, "sampling.max_tokens:"),
    ({"prompt": "hi", "temperature": -1.0}, "sampling.temperature:"),
    ({"prompt": "hi", "top_p": 2.0}, "sampling.top_p:"),
    ({"prompt": "hi", "stop": [""]}, "sampling.stop:"),
    ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids:"),
    ({"prompt_token_ids": [1] * 8192}, "prompt_token_ids:"),
    ({"prompt": "word " * 9000}, "prompt:"),  # tokenized off the event loop
])
def test_bad_requests_are_invalid_argument_naming_the_field(router, kwargs, field):
    error = rpc_error(router, router.client.generate(**kwargs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field), error.details()


def test_duplicate_request_id_is_already_exists(router):
    async def scenario():
        first = router.client.generate_stream("hi", request_id="twin", **LONG_RUN)
        await first.read()
        try:
            await router.client.generate("hi", request_id="twin", max_tokens=1)
        finally:
            first.cancel()

    error = rpc_error(router, scenario())
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "twin" in error.details()


def test_flood_beyond_the_bound_is_shed_fast_and_the_rest_succeed(router):
    num_calls = MAX_QUEUED_REQUESTS + 16

    async def one(index: int):
        start = time.monotonic()
        try:
            done = await router.client.generate(prompt_token_ids=[1, 2 + index], max_tokens=2,
                                                temperature=0.0, ignore_eos=True)
            return done.finish_reason, time.monotonic() - start
        except grpc.aio.AioRpcError as error:
            return error.code(), time.monotonic() - start

    async def flood():
        return await asyncio.gather(*(one(i) for i in range(num_calls)))

    results = router.run(flood())
    shed = [s for code, s in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [code for code, _ in results if code == "length"]
    assert len(shed) + len(served) == num_calls, results
    assert len(shed) >= num_calls - MAX_QUEUED_REQUESTS and served
    assert max(shed) < 2.0  # refused at once, never queued behind the model


# ---- early endings ------------------------------------------------------------------------------
def test_client_cancel_mid_stream_aborts_and_frees_blocks(router):
    async def scenario():
        call = router.client.generate_stream("Tell me a long story.", **LONG_RUN)
        for _ in range(2):
            assert (await call.read()).token_ids
        call.cancel()
        return await _code_of(call)

    assert router.run(scenario()) == grpc.StatusCode.CANCELLED
    router.wait_until_idle(timeout_s=5.0)  # 400 tokens would take far longer than this


def test_deadline_exceeded_aborts_and_frees_blocks(router):
    error = rpc_error(router, router.client.generate("Tell me a long story.", timeout_s=1.0,
                                                     **LONG_RUN))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    router.wait_until_idle(timeout_s=5.0)


def test_abort_rpc_ends_the_stream_with_finish_reason_abort(router):
    async def scenario():
        call = router.client.generate_stream("Tell me a long story.", request_id="victim",
                                             **LONG_RUN)
        responses = [await call.read()]
        assert await router.client.abort("victim")
        responses += await _read_rest(call)
        return responses, await call.code(), await router.client.abort("victim")

    responses, code, found_again = router.run(scenario())
    assert code == grpc.StatusCode.OK and not found_again
    last = responses[-1]
    assert last.finish_reason == "abort" and last.usage.completion_tokens < LONG_RUN["max_tokens"]
    assert last.usage.completion_tokens == sum(len(r.token_ids) for r in responses)


async def _read_rest(call: grpc.aio.UnaryStreamCall) -> list[generation_pb2.GenerateResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def _code_of(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
    try:
        await _read_rest(call)
    except asyncio.CancelledError:  # read() of a call this client cancelled
        pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return await call.code()


# ---- service surface ----------------------------------------------------------------------------
def test_health_reflection_and_model_info(router):
    with grpc.insecure_channel(router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    info = router.run(router.client.model_info())
    assert info.model_name == router.engine.model_config.name
    assert info.context_length == router.engine.max_model_len == 8192
    assert info.vocab_size == router.engine.model_config.vocab_size
    (pool,) = info.pools
    assert pool.num_instances == 1 and pool.role == generation_pb2.INSTANCE_ROLE_UNSPECIFIED


def test_cli_client_streams_the_completion(router, greedy_reference):
    prompt = SHORT_PROMPTS[1]
    result = _cli(router, prompt, "--max-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_reference[prompt].text + "\n"


def test_cli_client_chat_json(router):
    question = "What is the capital of France?"
    result = _cli(router, question, "--chat", "--json", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    completion = json.loads(result.stdout)
    assert "Paris" in completion["text"] and completion["finish_reason"] in ("stop", "length")
    assert completion["usage"]["prompt_tokens"] == len(chat_ids(router.engine.tokenizer, question))
    assert completion["usage"]["completion_tokens"] == len(completion["token_ids"])
    assert completion["timing"]["e2e_s"] >= completion["timing"]["ttft_s"] > 0


def test_cli_client_reports_a_grpc_error_in_one_line(router):
    result = _cli(router, "hi", "--max-tokens", "0")
    assert result.returncode == 1
    assert result.stderr.startswith("pdserve: error: INVALID_ARGUMENT: sampling.max_tokens")
    assert result.stderr.count("\n") == 1


def _cli(router: RouterHarness, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "pdserve", "client", *args, "--address",
                           router.address], capture_output=True, text=True, timeout=30,
                          cwd=REPO_ROOT, env=env)


def test_a_lagging_consumer_gets_the_backlog_as_one_event(router, greedy_reference):
    want = greedy_reference[SHORT_PROMPTS[1]]
    inp = GenerationInput("laggard", want.prompt_token_ids, SamplingParams(max_tokens=6, seed=0,
                          temperature=0.0), seed=0, arrival_time_s=time.monotonic())

    async def scenario():
        async with contextlib.aclosing(router.backend.generate(inp)) as events:
            first = await anext(events)
            while (await router.backend.cluster_state())[0].num_running_requests:
                await asyncio.sleep(0.02)  # the engine finishes while nobody reads
            return [first] + [event async for event in events]

    first, backlog = router.run(scenario())  # exactly two events for six tokens
    assert len(first.token_ids) == 1 and backlog.finish_reason == want.finish_reason
    assert first.token_ids + backlog.token_ids == want.token_ids
    assert first.text + backlog.text == want.text
    assert backlog.num_output_tokens == len(want.token_ids) and backlog.timing.e2e_s > 0


# ---- a router of its own: KV sizing, engine failure, shutdown --------------------------------------
@pytest.fixture
def small_router(default_loaded):
    """64 KV blocks (1024 tokens), 4 outstanding requests at most; stopped after the test."""
    harness = RouterHarness(build_engine(default_loaded, num_blocks=64), max_queued_requests=4)
    yield harness
    harness.close()  # stopping twice is harmless
    assert not harness.backend.is_ready()
    assert harness.engine.kv_manager.is_idle() and not harness.engine.requests


def test_a_request_larger_than_the_kv_pool_is_invalid_argument(small_router):
    error = rpc_error(small_router, small_router.client.generate("hi", max_tokens=2000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("sampling.max_tokens:") and "KV blocks" in error.details()


def test_an_engine_failure_is_internal_and_turns_health_off(small_router):
    def broken_step(*args, **kwargs):
        raise RuntimeError("injected engine failure")

    small_router.engine.step = broken_step
    error = rpc_error(small_router, small_router.client.generate("hi", max_tokens=4))
    assert error.code() == grpc.StatusCode.INTERNAL
    later = rpc_error(small_router, small_router.client.generate("hi", max_tokens=4))
    assert later.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(small_router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 5.0
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING after an engine failure"
            time.sleep(0.1)


def test_stop_with_a_stream_in_flight_is_bounded_and_frees_everything(small_router):
    harness = small_router

    async def scenario():
        call = harness.client.generate_stream("Tell me a long story.", **LONG_RUN)
        await call.read()
        start = time.monotonic()
        await harness.server.stop(grace_s=0.2)
        return await _code_of(call), time.monotonic() - start

    code, stop_s = harness.run(scenario())
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE) and stop_s < 5.0
    assert not harness.backend.is_ready()
    assert harness.engine.kv_manager.is_idle() and not harness.engine.requests
