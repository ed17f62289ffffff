"""The OpenAI-compatible HTTP API over the colocated backend (fast; the cluster is not the
point here): token auth, health while draining, the server's deadline, logprobs, mutual TLS
with the gRPC port's certificates, and the metrics an HTTP call leaves. Every scenario ends with the leak check."""

from __future__ import annotations

import math
import ssl

import httpx2 as httpx
import openai
import pytest

from router.client import PdserveClient
from router.colocated import ColocatedBackend
from router.security import RouterSecurity
from router.tls import ServerTls
from router.server import start_router
from tests.helpers import build_engine
from tests.serving.harness import ServerHarness
from tests.serving.test_router_security import certs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token"


class HttpHarness(ServerHarness):
    """A colocated router serving gRPC and HTTP, with the given security and timeout."""

    def __init__(self, backend, security: RouterSecurity | None = None,
                 request_timeout_s: float | None = None) -> None:
        self._start_loop()
        self.backend = backend
        self.server = self.run(start_router(backend, "127.0.0.1", 0, None, http_port=0,
                                            security=security,
                                            request_timeout_s=request_timeout_s), timeout_s=120)
        token = security.auth_token if security else None
        self.client = self.run(_grpc_client(self.server.address, token))
        self.openai = openai.OpenAI(base_url=self.server.http.url + "/v1", api_key=token or "x",
                                    max_retries=0, timeout=60)
        self.model = backend.model_info().model_name

    def count(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(
            f"pdserve:{name}", {"model_name": self.model, "transport": "http", **labels})
        return value or 0.0


async def _grpc_client(address: str, token: str | None) -> PdserveClient:
    return PdserveClient(address, token=token)  # made on the loop that uses it


@pytest.fixture(scope="module")
def secured(default_loaded):
    harness = HttpHarness(ColocatedBackend(build_engine(default_loaded, num_blocks=128), 8),
                          RouterSecurity(auth_token=TOKEN), request_timeout_s=2.0)
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def leak_check(secured):
    yield
    secured.wait_until_idle()


def test_a_missing_or_wrong_token_is_a_401_and_health_is_open(secured):
    url = secured.server.http.url
    refused_before = secured.count("router_requests_total", code="UNAUTHENTICATED")
    body = {"model": secured.model, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert TOKEN not in response.text
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert secured.count("router_requests_total", code="UNAUTHENTICATED") == refused_before + 3
    assert httpx.get(f"{url}/health").status_code == 200
    done = secured.openai.completions.create(model=secured.model, prompt="Hi", max_tokens=2)
    assert done.usage.completion_tokens >= 1


def test_completion_logprobs_are_the_sampled_tokens(secured):
    done = secured.openai.completions.create(model=secured.model, prompt="The sky is",
                                             max_tokens=6, temperature=0, logprobs=0,
                                             extra_body={"ignore_eos": True})
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == done.choices[0].text
    assert all(lp <= 0 and math.isfinite(lp) for lp in logprobs.token_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    chat = secured.openai.chat.completions.create(
        model=secured.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=0)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_the_server_deadline_is_a_504_and_aborts_the_request(secured):
    before = secured.count("router_requests_total", code="DEADLINE_EXCEEDED")
    with pytest.raises(openai.APIStatusError) as info:
        secured.openai.completions.create(model=secured.model, prompt="Count to a million.",
                                          max_tokens=1500, extra_body={"ignore_eos": True})
    assert info.value.status_code == 504 and info.value.body["type"] == "timeout_error"
    assert secured.count("router_requests_total", code="DEADLINE_EXCEEDED") == before + 1


def test_an_http_call_is_counted_like_a_grpc_one(secured):
    ok_before = secured.count("router_requests_total", code="OK")
    invalid_before = secured.count("router_request_errors_total", error_type="invalid_request")
    secured.openai.completions.create(model=secured.model, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        secured.openai.completions.create(model=secured.model, prompt="Hi", max_tokens=0)
    assert secured.count("router_requests_total", code="OK") == ok_before + 1
    assert secured.count("router_request_errors_total",
                         error_type="invalid_request") == invalid_before + 1


def test_draining_turns_health_off_and_refuses_new_calls_with_503(default_loaded):
    harness = HttpHarness(ColocatedBackend(build_engine(default_loaded, num_blocks=64), 4))
    try:
        url = harness.server.http.url
        assert httpx.get(f"{url}/health").status_code == 200
        harness.run(harness.server.drain())
        assert httpx.get(f"{url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as info:
            harness.openai.completions.create(model=harness.model, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["type"] == "service_unavailable_error"
    finally:
        harness.close()


def test_the_http_port_takes_the_grpc_ports_mutual_tls(default_loaded, certs):
    tls = ServerTls(certs["server"].cert, certs["server"].key, client_ca_file=certs["ca"].cert)
    harness = HttpHarness(ColocatedBackend(build_engine(default_loaded, num_blocks=32), 4),
                          RouterSecurity(tls=tls))
    try:
        url = harness.server.http.url
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=certs["ca"].cert)
        context.load_cert_chain(certs["client"].cert, certs["client"].key)
        assert httpx.get(f"{url}/health", verify=context).status_code == 200
        no_client_cert = ssl.create_default_context(cafile=certs["ca"].cert)
        with pytest.raises(httpx.HTTPError):  # the handshake, or the first read, fails
            httpx.get(f"{url}/health", verify=no_client_cert)
        with pytest.raises(httpx.HTTPError):  # plaintext cannot talk to it
            httpx.get(url.replace("https://", "http://") + "/health")
    finally:
        harness.close()


def test_n_choices_are_requests_of_their_own_with_seeds_in_sequence(secured):
    kwargs = {"model": secured.model, "prompt": "Once upon a time", "max_tokens": 8,
              "temperature": 1.0, "seed": 40, "extra_body": {"ignore_eos": True}}
    whole = secured.openai.completions.create(n=3, **kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.completion_tokens == 3 * 8 and whole.usage.prompt_tokens > 0
    singles = [secured.openai.completions.create(**(kwargs | {"seed": 40 + i})).choices[0].text
               for i in range(3)]
    assert [c.text for c in whole.choices] == singles  # choice i: the seed + i
    texts, reasons = ["", ""], [[], []]
    for chunk in secured.openai.completions.create(n=2, stream=True, **kwargs):
        choice = chunk.choices[0]
        texts[choice.index] += choice.text
        reasons[choice.index].append(choice.finish_reason)
    assert texts == singles[:2]
    assert all(r[-1] == "length" and set(r[:-1]) <= {None} for r in reasons)
    chat = secured.openai.chat.completions.create(
        model=secured.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
        temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message == chat.choices[1].message
