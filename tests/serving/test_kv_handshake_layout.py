"""The KV handshake between multi-rank instances: each channel end announces its instance's
parallel layout and its rank (hashed with the rest of the layout spec), and a mismatch names
both values."""

from __future__ import annotations

from dataclasses import replace

from kv_transfer import KVLayoutSpec
from kv_transfer.handshake import build_handshake, handshake_problems


def make_spec() -> KVLayoutSpec:
    return KVLayoutSpec("tiny-llama", "float32", 4, 2, 2, 8)


def test_handshake_names_both_parallel_layouts_and_ranks():
    prefill = replace(make_spec(), parallel_layout="tp=2 pp=1", rank=1)
    decode = replace(make_spec(), parallel_layout="tp=1 pp=2", rank=1)
    problems = handshake_problems(build_handshake(prefill, "prefill-0", "k"),
                                  build_handshake(decode, "decode-0", "k"))
    assert problems == ["parallel_layout: local='tp=2 pp=1' remote='tp=1 pp=2'"]
    other_rank = replace(prefill, rank=0)
    assert handshake_problems(build_handshake(prefill, "p", "k"),
                              build_handshake(other_rank, "d", "k")) == ["rank: local=1 remote=0"]
