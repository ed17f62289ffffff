"""The KV handshake between instances of different parallel layouts: everything but the layout
and the rank is compared; the two layouts must map (planner.py) and the plan must pair the two
ranks of the channel, else the refusal names why. Different block sizes are refused (blocks move
1:1, no re-blocking)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kv_transfer import KVLayoutSpec
from kv_transfer.handshake import build_handshake, handshake_problems


def make_spec() -> KVLayoutSpec:
    return KVLayoutSpec("tiny-llama", "float32", 4, 2, 2, 8)


def problems(prefill: KVLayoutSpec, decode: KVLayoutSpec) -> list[str]:
    as_prefill = handshake_problems(build_handshake(prefill, "prefill-0", "k"),
                                    build_handshake(decode, "decode-0", "k"),
                                    local_is_prefill=True)
    as_decode = handshake_problems(build_handshake(decode, "decode-0", "k"),
                                   build_handshake(prefill, "prefill-0", "k"),
                                   local_is_prefill=False)
    assert bool(as_prefill) == bool(as_decode)  # both ends agree
    return as_prefill


def test_different_layouts_map_when_the_plan_pairs_the_ranks():
    # prefill rank 1 of TP=2 holds head 1 of both layers; decode rank 1 of PP=2 holds layer 1
    prefill = replace(make_spec(), parallel_layout="tp=2 pp=1", rank=1)
    decode = replace(make_spec(), parallel_layout="tp=1 pp=2", rank=1)
    assert problems(prefill, decode) == []


def test_ranks_the_plan_does_not_pair_are_refused_naming_both():
    # TP=2 -> TP=2: rank 1 sends head 1 to rank 1 only
    prefill = replace(make_spec(), parallel_layout="tp=2 pp=1", rank=1)
    decode = replace(make_spec(), parallel_layout="tp=2 pp=1", rank=0)
    assert problems(prefill, decode) == [
        "parallel layouts: prefill rank 1 of tp=2 pp=1 sends nothing to decode rank 0 of "
        "tp=2 pp=1 (no channel between them in the transfer plan)"]


def test_a_layout_that_cannot_hold_the_model_is_refused():
    with pytest.raises(ValueError, match="num_kv_heads .2. and tensor parallel size 3"):
        replace(make_spec(), parallel_layout="tp=3 pp=1")
    with pytest.raises(ValueError, match="rank 2 is outside tp=2 pp=1"):
        replace(make_spec(), parallel_layout="tp=2 pp=1", rank=2)


def test_every_other_field_is_still_compared_block_size_included():
    decode = replace(make_spec(), block_size=8, parallel_layout="tp=2 pp=1")
    [message] = problems(make_spec(), decode)
    assert message.startswith("block_size: local=4 remote=8")
    assert "not re-blocked" in message
    assert problems(make_spec(), replace(make_spec(), num_kv_heads=1))[0] == \
        "num_kv_heads: local=2 remote=1"
