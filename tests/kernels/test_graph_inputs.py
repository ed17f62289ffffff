"""The decode graphs' static inputs (plain tensor work, checked on the CPU): every step must leave
exactly its own token ids, positions, slots, context lengths, block tables and in-flight rows
in the buffers, whatever rows held before (tables growing, sequences leaving, a preempted
sequence coming back with other blocks, tokens in flight under asynchronous scheduling)."""

from __future__ import annotations

import random

import torch

from engine.cuda_graphs import DecodeGraphRunner
from engine.plan import BlockTables, PlanBuilder
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput

BS = 4


def _runner() -> DecodeGraphRunner:
    return DecodeGraphRunner(model=None, kv_cache=torch.zeros(1), backend=None, block_size=BS,
                             max_model_len=256, sampled_ids=torch.zeros(8, dtype=torch.int64),
                             buckets=(1, 2, 4, 8))


def _chunk(request: Request, table: list[int]) -> ScheduledChunk:
    return ScheduledChunk(request, request.num_tokens - 1, 1, table, True)


def _check(runner: DecodeGraphRunner, chunks: list[ScheduledChunk], bucket: int) -> None:
    n = len(chunks)
    ids, pos, slots, _, fed_rows = runner.token_inputs[:, :bucket].tolist()
    for i, c in enumerate(chunks):
        p = c.start
        assert (ids[i], pos[i]) == (c.request.token_at(p), p)
        in_flight = p == c.request.num_known_tokens  # its id is on the device only
        assert fed_rows[i] == (c.request.inflight_row if in_flight else -1)
        assert slots[i] == c.block_table[p // BS] * BS + p % BS
        assert runner.context_lens[i].item() == p + 1
        assert runner.block_tables[i, : len(c.block_table)].tolist() == c.block_table
    assert slots[n:] == [-1] * (bucket - n) and fed_rows[n:] == [-1] * (bucket - n)
    assert runner.context_lens[n:bucket].tolist() == [1] * (bucket - n)


def test_load_inputs_tracks_changing_batches():
    rng = random.Random(0)
    runner, planner, tables = _runner(), PlanBuilder(), BlockTables()
    params = SamplingParams(max_tokens=1000, temperature=0.0)
    live: list[tuple[Request, list[int]]] = []
    next_block = 0
    for step in range(200):
        if len(live) < 8 and rng.random() < 0.3:  # admit a sequence
            r = Request(f"r{step}", [rng.randrange(100) for _ in range(rng.randrange(1, 20))],
                        params, 0, 1 << 20)
            live.insert(rng.randrange(len(live) + 1), (r, []))
        if live and rng.random() < 0.1:  # finish one
            live.pop(rng.randrange(len(live)))
        if live and rng.random() < 0.05:  # preempted and back: same length, a new table
            index = rng.randrange(len(live))
            r, table = live[index]
            live[index] = (r, list(range(next_block, next_block + len(table))))
            next_block += len(table)
        for row, (r, table) in enumerate(live):
            if r.num_inflight_tokens:  # read back
                r.num_inflight_tokens = 0
                r.output_token_ids.append(rng.randrange(100))
            if rng.random() < 0.5:  # the new token is in flight: sampled into `row`
                r.num_inflight_tokens, r.inflight_row = 1, row
            else:
                r.output_token_ids.append(rng.randrange(100))
            while len(table) * BS < r.num_tokens:
                table.append(next_block)
                next_block += 1
        if not live:
            continue
        chunks = [_chunk(r, t) for r, t in live]
        plan = planner.build(SchedulerOutput(chunks))
        tables.apply(plan)  # what the executor's copy of the tables holds after the plan
        bucket = plan.graph_bucket
        assert bucket == runner.bucket_for(len(chunks))
        runner.load_inputs(plan, tables.of(plan), bucket)
        _check(runner, chunks, bucket)
