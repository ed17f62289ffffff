"""2 prefill + 2 decode instances: every pair carries traffic and outputs equal colocated; a KV
layout mismatch between instances is a clear error when the pair is formed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import ray

from cluster.pools import ClusterStartupError, launch
from tests.helpers import build_engine
from tests.serving.disagg_cluster import (
    GREEDY_16,
    assert_equal_or_near_tie,
    cluster_config,
    local_ray,
    start_disagg_harness,
    token_prompts,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def cluster():
    with local_ray(num_cpus=8):
        # one KV message per layer (no byte minimum): layer-wise streaming across two pairs
        harness = start_disagg_harness(cluster_config(2, 2, min_message_bytes=0))
        yield harness
        harness.close()


def test_2p2d_outputs_equal_colocated_and_use_every_instance(cluster, default_loaded):
    engine = build_engine(default_loaded)
    prompts = token_prompts(default_loaded.tokenizer)
    expected = engine.generate(prompts, GREEDY_16)

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=16, temperature=0.0) for p in prompts))

    completions = cluster.run(run_all(), timeout_s=300)
    for prompt, got, want in zip(prompts, completions, expected):
        assert_equal_or_near_tie(engine, prompt, got.token_ids, want.token_ids)
    stats = [ray.get(w.actor.stats.remote()) for w in cluster.backend.pools.all]
    assert all(s.state.total_kv_blocks for s in stats)
    cluster.wait_until_idle()


def test_handshake_mismatch_is_a_startup_error(cluster):
    """A decode instance with another block size cannot pair with the running prefill."""
    prefill = cluster.backend.pools.prefill[0]
    odd = dataclasses.replace(cluster.backend.pools.decode[0].spec, instance_id="decode-odd")
    odd.engine = dataclasses.replace(odd.engine, cache=dataclasses.replace(odd.engine.cache, block_size=32))

    async def start_mismatched():
        return await launch([dataclasses.replace(prefill.spec, instance_id="prefill-odd")], [odd])

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ClusterStartupError) as info:
            loop.run_until_complete(start_mismatched())
    finally:
        loop.close()
    message = str(info.value)
    assert "prefill-odd" in message and "decode-odd" in message and "block_size" in message
