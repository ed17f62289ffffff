"""The multi-turn chat workload of the routing benchmark (benchmarks/multiturn_workload.py,
benchmarks/serving_multiturn.py): its shape, its file round trip, and the per-run token shift
that keeps runs from sharing cached blocks while keeping every length and every shared prefix."""

from __future__ import annotations

import pytest

from benchmarks.multiturn_workload import FIRST_TOKEN_ID, Workload, generate
from benchmarks.serving_multiturn import VARIANTS, by_variant, shifted
from router.prefix_index import request_block_hashes

VOCAB = 1000


def test_the_workload_has_the_asked_shape_and_survives_its_file(tmp_path):
    workload = generate(4, 3, system_tokens=50, user_tokens=10, output_tokens=5,
                        vocab_size=VOCAB, seed=7)
    assert len(workload.system_token_ids) == 50 and workload.num_requests == 12
    turns = [t for c in workload.conversations for t in c.turns]
    assert all(5 <= len(t.user_token_ids) <= 15 and t.max_tokens == 5 for t in turns)
    ids = workload.system_token_ids + [i for t in turns for i in t.user_token_ids]
    assert FIRST_TOKEN_ID <= min(ids) and max(ids) < VOCAB
    path = tmp_path / "w.json"
    path.write_text(workload.to_json())
    assert Workload.load(path) == workload
    assert generate(4, 3, 50, 10, 5, VOCAB, seed=7) == workload  # deterministic by seed
    with pytest.raises(ValueError, match="turns must be >= 1"):
        generate(4, 0, 50, 10, 5, VOCAB)


def test_a_shifted_run_shares_prefixes_within_itself_and_no_block_with_another():
    workload = generate(2, 1, system_tokens=64, user_tokens=16, output_tokens=4,
                        vocab_size=VOCAB, seed=1)
    system = workload.system_token_ids
    one, two = shifted(system, 1, VOCAB), shifted(system, 2, VOCAB)
    assert len(one) == len(system) and min(one) >= FIRST_TOKEN_ID and max(one) < VOCAB
    first = request_block_hashes(one + [5], 16)
    assert not set(first) & set(request_block_hashes(two + [5], 16))
    assert first == request_block_hashes(shifted(system, 1, VOCAB) + [6], 16)


def test_the_comparison_covers_every_policy_and_caching_both_ways():
    assert {v.policy for v in VARIANTS if v.prefix_caching} == {"kv_aware", "least_loaded",
                                                                "round_robin"}
    assert any(not v.prefix_caching for v in VARIANTS)


def test_variants_pool_their_runs():
    runs = [{"variant": "kv_aware/cache_on", "ttfts_ms": [1.0, 2.0, 3.0], "prompt_tokens": 10,
             "prefill_tokens_computed": 4, "prefix_hit_tokens": 6,
             "router_predicted_hit_tokens": 5},
            {"variant": "kv_aware/cache_on", "ttfts_ms": [4.0], "prompt_tokens": 10,
             "prefill_tokens_computed": 2, "prefix_hit_tokens": 8,
             "router_predicted_hit_tokens": 8}]
    pooled = by_variant(runs)["kv_aware/cache_on"]
    assert pooled["runs"] == 2 and pooled["ttft_p50_ms"] == 2.5 and pooled["hit_rate"] == 0.7
    assert pooled["prefill_tokens_computed"] == 6 and pooled["router_predicted_hit_tokens"] == 13
