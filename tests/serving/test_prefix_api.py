"""`cache_salt` and `cached_tokens` through both transports (colocated backend, real gRPC and
HTTP over loopback): a repeated prompt reports the cached prefix in the usage, a different salt
never shares it, bad salts are refused naming the field; the engine's blocks all come back."""

from __future__ import annotations

import grpc
import openai
import pytest

from router.colocated import ColocatedBackend
from router.validation import MAX_CACHE_SALT_CHARS
from tests.helpers import LONG_TEXT, build_engine
from tests.serving.test_openai_colocated import HttpHarness

pytestmark = pytest.mark.timeout(180)
BLOCK_SIZE = 16
PROMPT = "Summarize in one line.\n\n" + LONG_TEXT  # several full blocks


@pytest.fixture(scope="module")
def served(default_loaded):
    engine = build_engine(default_loaded, block_size=BLOCK_SIZE, num_blocks=96,
                          enable_prefix_caching=True)
    harness = HttpHarness(ColocatedBackend(engine, 8))
    yield harness
    harness.close()


@pytest.fixture(autouse=True)
def leak_check(served):
    yield
    served.wait_until_idle()  # free_kv_blocks counts cached-free blocks as free
    kv = served.backend._engine.kv_manager
    assert kv.is_idle() and kv.num_free_blocks == kv.num_blocks


def _grpc(served, salt: str | None, text: str = PROMPT):
    return served.run(served.client.generate(text, max_tokens=3, temperature=0.0,
                                             cache_salt=salt))


def test_grpc_usage_counts_the_cached_prefix_per_salt(served):
    first = _grpc(served, "tenant-a", PROMPT + " A")
    again = _grpc(served, "tenant-a", PROMPT + " B")  # same prefix, same salt: whole blocks hit
    other = _grpc(served, "tenant-b", PROMPT + " A")  # a salt never seen: nothing shared
    plain = _grpc(served, None, PROMPT + " A")  # no salt is a namespace of its own
    assert first.usage.cached_tokens == 0
    prompt_tokens = again.usage.prompt_tokens
    assert 0 < again.usage.cached_tokens < prompt_tokens
    assert again.usage.cached_tokens % BLOCK_SIZE == 0
    assert again.usage.cached_tokens >= (prompt_tokens // BLOCK_SIZE - 2) * BLOCK_SIZE
    assert other.usage.cached_tokens == 0 and plain.usage.cached_tokens == 0
    assert other.token_ids == first.token_ids == plain.token_ids  # a hit changes no token


@pytest.mark.parametrize("salt, problem", [
    ("", "must not be empty"),
    ("x" * (MAX_CACHE_SALT_CHARS + 1), f"at most {MAX_CACHE_SALT_CHARS}"),
    ("tab\there", "printable ASCII"),
    ("é", "printable ASCII"),
])
def test_a_bad_salt_is_invalid_argument_naming_the_field(served, salt, problem):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _grpc(served, salt)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in info.value.details() and problem in info.value.details()


def test_openai_usage_reports_prompt_tokens_details(served):
    def complete(salt: str):
        return served.openai.completions.create(
            model=served.model, prompt=PROMPT + " C", max_tokens=2, temperature=0,
            extra_body={"cache_salt": salt})

    first, again = complete("http-tenant"), complete("http-tenant")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    chat = served.openai.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
        temperature=0, extra_body={"cache_salt": "chat-tenant"})
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:
        complete("\x00")
    assert "cache_salt" in str(info.value.body)


def test_prefix_caching_is_a_per_pool_key_and_a_cli_flag():
    from cluster.config import cluster_config_from_dict, with_overrides
    from cluster.pools import worker_specs
    from pdserve.cli import build_parser

    config = cluster_config_from_dict({"device": "cpu", "decode": {"prefix_caching": False},
                                       "conditional_disagg_max_uncached_tokens": 32})
    prefill, decode = worker_specs(config, "127.0.0.1")
    assert prefill[0].engine.cache.enable_prefix_caching  # on by default
    assert not decode[0].engine.cache.enable_prefix_caching
    assert config.conditional_disagg_max_uncached_tokens == 32
    off = with_overrides(cluster_config_from_dict({"device": "cpu"}), prefix_caching=False)
    assert not off.prefill.prefix_caching and not off.decode.prefix_caching
    with pytest.raises(ValueError, match="conditional_disagg_max_uncached_tokens"):
        cluster_config_from_dict({"conditional_disagg_max_uncached_tokens": -1})
    with pytest.raises(ValueError, match="prefill.prefix_caching"):
        cluster_config_from_dict({"prefill": {"prefix_caching": "yes"}})
    parser = build_parser()
    assert parser.parse_args(["serve", "--no-prefix-caching"]).prefix_caching is False
    assert parser.parse_args(["serve"]).prefix_caching is None  # the config decides
    assert parser.parse_args(["generate", "--prompt", "x"]).prefix_caching is True
    assert not parser.parse_args(["generate", "--prompt", "x",
                                  "--no-prefix-caching"]).prefix_caching
