"""The transfer planner between prefill and decode layouts (kv_transfer/planner.py), checked
exhaustively over tensor sizes, pipeline sizes and splits, and KV head counts: every (layer,
KV head) a decode rank holds arrives exactly once, from a prefill rank that holds it; a pair of
ranks exchanges at most one shard; the same layout maps rank i -> rank i; replicated heads are
read from every replica in turn; layouts that cannot hold the model are refused naming why.
Also the per-shard outcome counting of a transfer (kv_transfer/shards.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kv_transfer.planner import (KVShard, ModelShape, ParallelLayout, layout_problems,
                                 message_between, plan_transfer, rank_shard, receives_of,
                                 sends_of)
from kv_transfer.shards import ShardOutcomes
from protos.pdserve.v1 import worker_pb2

TP_SIZES = (1, 2, 3, 4, 6, 8)
HEADS = (1, 2, 3, 4, 6, 8)
PIPELINES = ((1, None), (2, None), (3, None), (2, (1, 5)), (3, (4, 1, 1)))
NUM_LAYERS = 6


def layouts(num_kv_heads: int):
    model = ModelShape(NUM_LAYERS, num_kv_heads)
    for tp, (pp, stages) in itertools.product(TP_SIZES, PIPELINES):
        layout = ParallelLayout(tp, pp, stages)
        if not layout_problems(layout, model, "x"):
            yield layout


def cells(shard: KVShard) -> set[tuple[int, int]]:
    return set(itertools.product(range(*shard.layers), range(*shard.heads)))


@pytest.mark.parametrize("num_kv_heads", HEADS)
def test_every_decode_cell_arrives_exactly_once_from_a_rank_that_holds_it(num_kv_heads):
    model = ModelShape(NUM_LAYERS, num_kv_heads)
    num_plans = 0
    for prefill, decode in itertools.product(layouts(num_kv_heads), repeat=2):
        plan = plan_transfer(prefill, decode, model)
        num_plans += 1
        pairs = Counter((m.prefill_rank, m.decode_rank) for m in plan)
        assert max(pairs.values()) == 1, (prefill, decode)  # one shard per rank pair
        for m in plan:
            assert rank_shard(prefill, model, m.prefill_rank).contains(m.shard)
        for d in range(decode.world_size):
            got = Counter(c for m in receives_of(plan, d) for c in cells(m.shard))
            assert set(got) == cells(rank_shard(decode, model, d)), (prefill, decode, d)
            assert max(got.values()) == 1, (prefill, decode, d)  # one replica read per cell
        assert message_between(plan, 0, 0) is not None  # rank 0 pairs keep the instance key
    assert num_plans > 100


@pytest.mark.parametrize("num_kv_heads", HEADS)
def test_the_same_layout_maps_each_rank_onto_itself(num_kv_heads):
    model = ModelShape(NUM_LAYERS, num_kv_heads)
    for layout in layouts(num_kv_heads):
        plan = plan_transfer(layout, layout, model)
        assert [(m.prefill_rank, m.decode_rank) for m in plan] == \
            [(r, r) for r in range(layout.world_size)]
        assert all(m.shard == rank_shard(layout, model, m.decode_rank) for m in plan)


def test_replicated_prefill_heads_are_read_once_and_spread_over_replicas():
    model = ModelShape(4, 2)
    # prefill TP=4 holds head 0 on ranks 0, 1 and head 1 on ranks 2, 3; decode TP=2 wants one
    # head per rank: each is read from one replica, and different replicas serve different ranks
    plan = plan_transfer(ParallelLayout(4), ParallelLayout(2), model)
    assert [(m.prefill_rank, m.decode_rank, m.shard.heads) for m in plan] == \
        [(0, 0, (0, 1)), (3, 1, (1, 2))]
    # one KV head, prefill TP=4, decode TP=1: read from rank 0 only, the others send nothing
    plan = plan_transfer(ParallelLayout(4), ParallelLayout(1), ModelShape(4, 1))
    assert [(m.prefill_rank, m.decode_rank) for m in plan] == [(0, 0)]
    assert sends_of(plan, 1) == sends_of(plan, 2) == sends_of(plan, 3) == []


def test_decode_replicas_each_receive_their_head():
    model = ModelShape(4, 1)  # one KV head; decode TP=4 holds it on every rank
    plan = plan_transfer(ParallelLayout(1), ParallelLayout(4), model)
    assert [(m.prefill_rank, m.decode_rank, m.shard) for m in plan] == \
        [(0, d, KVShard((0, 4), (0, 1))) for d in range(4)]


def test_pipeline_stages_map_layer_ranges_to_their_owners():
    model = ModelShape(6, 2)
    plan = plan_transfer(ParallelLayout(1, 2, (2, 4)), ParallelLayout(2, 1), model)
    assert [(m.prefill_rank, m.decode_rank, m.shard.layers, m.shard.heads) for m in plan] == [
        (0, 0, (0, 2), (0, 1)), (1, 0, (2, 6), (0, 1)),
        (0, 1, (0, 2), (1, 2)), (1, 1, (2, 6), (1, 2))]
    plan = plan_transfer(ParallelLayout(2, 1), ParallelLayout(1, 3), model)
    assert [(m.prefill_rank, m.decode_rank, m.shard.layers, m.shard.heads) for m in plan] == [
        (0, 0, (0, 2), (0, 1)), (1, 0, (0, 2), (1, 2)), (0, 1, (2, 4), (0, 1)),
        (1, 1, (2, 4), (1, 2)), (0, 2, (4, 6), (0, 1)), (1, 2, (4, 6), (1, 2))]


def test_layouts_that_cannot_hold_the_model_are_refused_naming_why():
    model = ModelShape(4, 2)
    with pytest.raises(ValueError, match=r"decode layout tp=3 pp=1: num_kv_heads \(2\) and "
                                         r"tensor parallel size 3 must divide one another"):
        plan_transfer(ParallelLayout(1), ParallelLayout(3), model)
    with pytest.raises(ValueError, match="prefill layout tp=1 pp=5: pipeline parallel size 5"):
        plan_transfer(ParallelLayout(1, 5), ParallelLayout(1), model)
    with pytest.raises(ValueError, match=r"pipeline_layers \[1, 1\] must give"):
        plan_transfer(ParallelLayout(1, 2, (1, 1)), ParallelLayout(1), model)


def test_layout_names_round_trip_and_bad_ones_name_the_format():
    for layout in (ParallelLayout(), ParallelLayout(4, 2), ParallelLayout(2, 3, (1, 2, 3))):
        assert ParallelLayout.parse(layout.name) == layout
    for bad in ("tp=2", "tp=2 pp=1 dp=2", "tp=x pp=1", "tp=2 pp=2 stages=3"):
        with pytest.raises(ValueError, match="parallel layout|ParallelLayout"):
            ParallelLayout.parse(bad)
    with pytest.raises(ValueError, match="KVShard.heads"):
        KVShard((0, 1), (2, 2))


def _ok(num_bytes: int) -> worker_pb2.TransferResult:
    return worker_pb2.TransferResult(status=worker_pb2.TRANSFER_STATUS_OK, num_bytes=num_bytes)


def test_outcomes_are_combined_once_every_shard_of_the_plan_reported():
    outcomes = ShardOutcomes(world_size=2)
    outcomes.begin("r", {0: 2})  # rank 0 carries two shards, rank 1 none
    assert outcomes.report("r", 1, _ok(5)) is None  # not expected from rank 1: ignored
    assert outcomes.report("r", 0, _ok(3)) is None
    combined = outcomes.report("r", 0, _ok(4))
    assert combined.status == worker_pb2.TRANSFER_STATUS_OK and combined.num_bytes == 7
    assert outcomes.report("r", 0, _ok(4)) is None  # a duplicate after the end
    outcomes.begin("f", {0: 1, 1: 2})
    failed = worker_pb2.TransferResult(status=worker_pb2.TRANSFER_STATUS_TIMEOUT, message="x")
    assert outcomes.report("f", 1, failed) is None  # a failure still waits for every shard
    assert outcomes.report("f", 0, _ok(1)) is None
    assert outcomes.report("f", 1, _ok(1)).status == worker_pb2.TRANSFER_STATUS_TIMEOUT
    with pytest.raises(ValueError, match="expected shard outcomes"):
        outcomes.begin("bad", {2: 1})
