"""Per-pool engine options that cross the hand-off: the KV cache dtype (both pools alike) and
speculative decoding (decode pools only) reach each instance's EngineConfig; bad values are
refused naming the field."""

from __future__ import annotations

import pytest

from cluster.config import cluster_config_from_dict
from cluster.pools import worker_specs


def test_fp8_kv_and_ngram_reach_the_engines():
    cfg = cluster_config_from_dict({
        "model": "tiny",
        "prefill": {"kv_cache_dtype": "fp8_e4m3"},
        "decode": {"kv_cache_dtype": "fp8_e4m3", "speculative_method": "ngram",
                   "num_speculative_tokens": 3}})
    prefill, decode = worker_specs(cfg, "127.0.0.1")
    assert prefill[0].engine.cache.kv_cache_dtype == "fp8_e4m3"
    assert not prefill[0].engine.speculative.enabled
    spec = decode[0].engine.speculative
    assert decode[0].engine.cache.kv_cache_dtype == "fp8_e4m3"
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 3)


@pytest.mark.parametrize("sections, message", [
    ({"prefill": {"kv_cache_dtype": "fp8_e4m3"}}, "must match"),
    ({"decode": {"kv_cache_dtype": "int4"}}, "decode.kv_cache_dtype"),
    ({"prefill": {"speculative_method": "ngram"}}, "prefill.speculative_method"),
    ({"decode": {"speculative_method": "medusa"}}, "decode speculative decoding"),
    ({"decode": {"speculative_method": "ngram", "num_speculative_tokens": 9}},
     "num_speculative_tokens"),
])
def test_bad_options_are_refused(sections, message):
    with pytest.raises(ValueError, match=message):
        cluster_config_from_dict({"model": "tiny", **sections})
