"""The default model (SmolLM2-135M: 3 KV heads, 30 layers) served by the whole stack, as
`pdserve serve` starts it, with pools of different sizes in the cluster config: prefill TP=1 ->
decode TP=3 (each decode rank receives one KV head from the one prefill rank) and prefill TP=3 ->
decode TP=1 (the decode rank receives one head from each prefill rank). Greedy streams equal the
colocated TP=1 engine's (or a near tie), and every pool is full again afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from engine.sampling_params import SamplingParams
from tests.helpers import assert_tokens_or_near_tie, build_engine
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # ~6 min on 2 CPU cores
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference(default_loaded):
    return build_engine(default_loaded)


# One direction in `make test` (the other is the same planner and channels, and the tiny-model
# matrix covers every TP pair); PDSERVE_FULL_RESHARD=1 runs both.
_LAYOUTS = [(1, 3), (3, 1)] if os.environ.get("PDSERVE_FULL_RESHARD") else [(1, 3)]


@pytest.mark.parametrize("prefill_tp,decode_tp", _LAYOUTS, ids=["p1-d3", "p3-d1"][:len(_LAYOUTS)])
def test_default_model_across_pool_layouts_streams_equal_colocated(default_loaded, reference,
                                                                   prefill_tp, decode_tp):
    config = cluster_config(1, 1, num_blocks=128, transfer_timeout_s=30.0)
    config = dataclasses.replace(
        config,
        prefill=dataclasses.replace(config.prefill, tensor_parallel_size=prefill_tp,
                                    cpus_per_instance=prefill_tp, collective_timeout_s=120.0),
        decode=dataclasses.replace(config.decode, tensor_parallel_size=decode_tp,
                                   cpus_per_instance=decode_tp, collective_timeout_s=120.0))
    tokenizer = default_loaded.tokenizer
    prompts = [tokenizer.encode(text) for text in (
        "The capital of France is", "Write a haiku about rain.",
        "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen")]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with local_ray():
        cluster = start_disagg_harness(config)
        try:
            async def run_all():
                return await asyncio.gather(*(cluster.client.generate(
                    prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0,
                    ignore_eos=True) for p in prompts))
            completions = cluster.run(run_all(), timeout_s=300)
            expected = reference.generate(prompts, [greedy] * len(prompts))
            for prompt, got, want in zip(prompts, completions, expected):
                assert_tokens_or_near_tie(reference, prompt, greedy, list(got.token_ids),
                                          want.token_ids[-MAX_TOKENS:])
            cluster.wait_until_idle(timeout_s=60)
        finally:
            cluster.close()
