"""The OpenAI-compatible HTTP API against a 1 prefill + 1 decode CPU cluster on a local Ray,
with the real `openai` client: greedy completions and chat completions equal the local engine,
streams join to the non-streamed result, usage and finish reasons as clients rely on them,
seeded sampling, 16 concurrent streams, every bad field a 400 naming it, overload a 429 at
once, and a client that disconnects mid-stream leaves no block held. Every scenario ends with
the leak check."""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import pytest

from cluster.config import with_overrides
from engine.sampling_params import SamplingParams
from tests.helpers import build_engine
from tests.serving.disagg_cluster import (MAX_INFLIGHT, cluster_config, local_ray,
                                          start_disagg_harness, token_prompts)

pytestmark = pytest.mark.timeout(300)
TEXT_PROMPTS = ["The capital of France is", "Once upon a time, there was a",
                "def fibonacci(n):", "1, 2, 3, 4,"]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 12 times 11?"]
LONG = {"max_tokens": 2000, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        harness = start_disagg_harness(with_overrides(cluster_config(1, 1), http_port=0))
        yield harness
        harness.close()


@pytest.fixture(autouse=True)
def leak_check(cluster):
    yield
    cluster.wait_until_idle(timeout_s=60)


@pytest.fixture(scope="module")
def base_url(cluster) -> str:
    return cluster.server.http.url + "/v1"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(cluster) -> str:
    return cluster.backend.model_info().model_name


@pytest.fixture(scope="module")
def engine(default_loaded):
    return build_engine(default_loaded)


def greedy(engine, prompt_ids: list[int], max_tokens: int = 16):
    return engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]


def http_count(cluster, code: str) -> float:
    value = cluster.server.metrics.registry.get_sample_value(
        "pdserve:router_requests_total",
        {"model_name": cluster.backend.model_info().model_name, "transport": "http", "code": code})
    return value or 0.0


def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list().data] == [model]


def test_greedy_completions_equal_the_local_engine(client, model, engine):
    tokenizer = engine.tokenizer
    for prompt in TEXT_PROMPTS:
        got = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        want = greedy(engine, tokenizer.encode(prompt))
        choice = got.choices[0]
        assert choice.text == want.text and choice.finish_reason == want.finish_reason, prompt
        assert got.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.id.startswith("cmpl-") and got.system_fingerprint and got.model == model
    ids = tokenizer.encode(TEXT_PROMPTS[0])  # a prompt as token ids: the same completion
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == greedy(engine, ids).text


def test_greedy_chat_completions_equal_the_local_engine(client, model, engine):
    for question in QUESTIONS:
        messages = [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": question}]
        got = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                             temperature=0)
        prompt_ids = engine.tokenizer.apply_chat_template(messages)
        want = greedy(engine, prompt_ids, max_tokens=24)
        assert got.choices[0].message.content == want.text
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].finish_reason == want.finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            len(prompt_ids), len(want.token_ids))
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    as_parts = client.chat.completions.create(model=model, messages=parts, max_tokens=24,
                                              temperature=0)
    as_text = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24,
        temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_deltas_join_to_the_non_streamed_result(client, model, endpoint):
    if endpoint == "completions":
        create, kwargs = client.completions.create, {"prompt": TEXT_PROMPTS[1]}
    else:
        create = client.chat.completions.create
        kwargs = {"messages": [{"role": "user", "content": QUESTIONS[1]}]}
    whole = create(model=model, max_tokens=20, temperature=0, **kwargs)
    chunks = list(create(model=model, max_tokens=20, temperature=0, stream=True,
                         stream_options={"include_usage": True}, **kwargs))
    choice_chunks, usage_chunk = chunks[:-1], chunks[-1]
    texts = [(c.choices[0].text if endpoint == "completions" else c.choices[0].delta.content)
             for c in choice_chunks]
    want = (whole.choices[0].text if endpoint == "completions"
            else whole.choices[0].message.content)
    assert "".join(texts) == want and len(choice_chunks) > 1  # deltas, not the text so far
    reasons = [c.choices[0].finish_reason for c in choice_chunks]
    assert reasons[:-1] == [None] * (len(reasons) - 1)
    assert reasons[-1] == whole.choices[0].finish_reason
    # the same counts; the second call may find the first's prompt in the prefix cache
    details = {"prompt_tokens_details"}
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump(exclude=details) == whole.usage.model_dump(exclude=details)
    assert (usage_chunk.usage.prompt_tokens_details.cached_tokens
            >= whole.usage.prompt_tokens_details.cached_tokens)
    usage = usage_chunk.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in choice_chunks)
    assert len({c.id for c in chunks}) == 1


def test_seeded_sampling_is_reproducible(client, model):
    def sample(seed: int) -> str:
        return client.completions.create(model=model, prompt=TEXT_PROMPTS[1], max_tokens=24,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_sixteen_concurrent_streams_equal_the_local_engine(base_url, model, engine):
    prompts = token_prompts(engine.tokenizer)
    assert len(prompts) == 16
    expected = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))

    async def stream_one(client: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, str]:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                                 temperature=0, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run_all():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))
        finally:
            await client.close()

    for (text, reason), want in zip(asyncio.run(run_all()), expected):
        assert (text, reason) == (want.text, want.finish_reason)


def test_a_stream_is_text_event_stream_ending_with_done(base_url, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True}
    response = httpx.post(f"{base_url}/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


BAD_FIELDS = [
    ({"temperature": -0.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": 1.5}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2 ** 33}, "max_tokens"),
    ({"stop": 7}, "stop"), ({"stop": ["x"] * 17}, "stop"), ({"stop": [""]}, "stop"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": ""}, "prompt"), ({"prompt": [10 ** 6]}, "prompt"), ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": None}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]
BAD_CHAT_FIELDS = [
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]},
                                     "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"), ({"tools": [{"x": 1}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_completion_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("fields,param", BAD_FIELDS, ids=[p for _, p in BAD_FIELDS])
def test_a_bad_completion_field_is_a_400_naming_it(base_url, model, fields, param):
    body = {"model": model, "prompt": "Hi", "max_tokens": 4} | fields
    assert_bad_request(f"{base_url}/completions", body, param)


@pytest.mark.parametrize("fields,param", BAD_CHAT_FIELDS, ids=[p for _, p in BAD_CHAT_FIELDS])
def test_a_bad_chat_field_is_a_400_naming_it(base_url, model, fields, param):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4} | fields
    assert_bad_request(f"{base_url}/chat/completions", body, param)


def assert_bad_request(url: str, body: dict, param: str) -> None:
    started = time.monotonic()
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param), error
    assert time.monotonic() - started < 2.0


def test_unknown_fields_are_ignored_and_an_unknown_model_is_a_404(client, model):
    done = client.completions.create(model=model, prompt="Hi", max_tokens=2,
                                     extra_body={"no_such_field": 1, "user": "u1"})
    assert done.usage.completion_tokens <= 2
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"


def test_overload_is_a_429_at_once(base_url, model, cluster):
    async def flood():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                    timeout=120)

        async def first_chunk():
            started = time.monotonic()
            try:
                stream = await client.completions.create(model=model, prompt="Keep talking.",
                                                         stream=True, **LONG)
            except openai.RateLimitError as error:
                return 429, time.monotonic() - started, error.body
            async for _ in stream:
                break
            await stream.close()  # the client goes away: the request is aborted
            return 200, time.monotonic() - started, None

        try:
            return await asyncio.gather(*(first_chunk() for _ in range(MAX_INFLIGHT + 16)))
        finally:
            await client.close()

    results = asyncio.run(flood())
    refused = [r for r in results if r[0] == 429]
    assert len(refused) >= 16 and any(r[0] == 200 for r in results)
    assert all(elapsed < 5.0 for _, elapsed, _ in refused)
    assert refused[0][2]["type"] == "rate_limit_error"


def test_a_client_that_disconnects_mid_stream_leaves_no_block_held(base_url, model, cluster):
    cancelled_before = http_count(cluster, "CANCELLED")
    body = {"model": model, "prompt": "Tell me a long story.", "stream": True, "max_tokens": 2000,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/completions", json=body) as response:
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    break  # leaving both blocks closes the connection mid-stream
    cluster.wait_until_idle(timeout_s=30)
    deadline = time.monotonic() + 10
    while http_count(cluster, "CANCELLED") < cancelled_before + 1:
        assert time.monotonic() < deadline, "the disconnect was not counted as CANCELLED"
        time.sleep(0.1)


def test_http_calls_are_counted_with_their_transport(cluster):
    assert http_count(cluster, "OK") > 0 and http_count(cluster, "INVALID_ARGUMENT") > 0
    assert http_count(cluster, "RESOURCE_EXHAUSTED") >= 16
