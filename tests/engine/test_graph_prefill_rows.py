"""Short prompt chunks in the decode CUDA graphs (engine/plan.py `PlanBuilder._bucket`,
engine/cuda_graphs.py `_rows`, engine/model_runner.py `_replay_decode`), on the CPU.

Which steps get a graph bucket (prompt chunks whose context end is within
`graph_prefill_max_context`, rows within the captured buckets), how a mixed step's tokens become
graph rows, which rows sample, and — running the graph's step function eagerly with the torch
reference attention — that a step of decodes, a verification, a completed prompt and a chunk
ending mid-prompt computes, row for row, the logits and KV of the eager mixed step."""

from __future__ import annotations

import pytest
import torch

from engine.attention.torch_ref import TorchAttentionBackend
from engine.builder import build_model, init_random_weights
from engine.config import EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.cuda_graphs import DecodeGraphRunner
from engine.model_runner import ModelRunner
from engine.models.config import ModelConfig
from engine.plan import BlockTables, PlanBuilder, graph_rows
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput

BS = 4
MAX_LEN = 64
CFG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=MAX_LEN, rope_theta=10000.0)


def _request(rid: str, prompt_len: int, outputs: int = 0) -> Request:
    prompt = [(7 * i + len(rid)) % CFG.vocab_size for i in range(prompt_len)]
    r = Request(rid, prompt, SamplingParams(max_tokens=100), 0, MAX_LEN)
    r.output_token_ids.extend(range(50, 50 + outputs))
    return r


def _table(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BS)))


def _prompt(request: Request, start: int, count: int, first_block: int) -> ScheduledChunk:
    end = start + count
    return ScheduledChunk(request, start, count, _table(first_block, end),
                          end == request.num_tokens)


def _decode(request: Request, first_block: int) -> ScheduledChunk:
    return ScheduledChunk(request, request.num_tokens - 1, 1,
                          _table(first_block, request.num_tokens), True)


def _bucket(chunks, **kw) -> int | None:
    return PlanBuilder(**kw).build(SchedulerOutput(chunks)).graph_bucket


def test_short_prompts_get_a_bucket_of_their_rows_only_when_enabled():
    prompt = _prompt(_request("p", 20), 0, 20, 0)
    assert _bucket([prompt]) is None  # graph prefill off by default (0)
    assert _bucket([prompt], graph_prefill_max_context=32) == 32
    decodes = [_decode(_request(f"d{i}", 5, 2), 10 * i + 10) for i in range(3)]
    assert _bucket(decodes + [prompt], graph_prefill_max_context=32) == 32  # 23 rows
    assert _bucket(decodes, graph_prefill_max_context=32) == 4  # decodes as before


def test_the_cap_is_on_the_context_end_not_the_chunk_length():
    # 8 new tokens after 28 cached ones: each of the 8 rows would read up to 36 tokens
    request = _request("c", 36)
    late = _prompt(request, 28, 8, 0)
    assert _bucket([late], graph_prefill_max_context=32) is None
    assert _bucket([late], graph_prefill_max_context=36) == 8
    first = _prompt(request, 0, 8, 0)  # the same length from position 0: within the cap
    assert _bucket([first], graph_prefill_max_context=32) == 8


def test_prompt_rows_stay_within_the_captured_buckets_and_tables_within_their_width():
    chunks = [_prompt(_request(f"p{i}", 30), 0, 30, 10 * i) for i in range(3)]  # 90 rows
    assert _bucket(chunks, graph_prefill_max_context=64) == 128
    assert _bucket(chunks, graph_prefill_max_context=64, graph_prefill_max_rows=64) is None
    decodes = [_decode(_request(f"d{i}", 5, 2), 4 * i) for i in range(90)]
    assert _bucket(decodes, graph_prefill_max_context=64, graph_prefill_max_rows=64) == 128
    assert _bucket(chunks, graph_prefill_max_context=64, max_blocks_per_seq=7) is None
    assert _bucket(chunks, graph_prefill_max_context=64, max_blocks_per_seq=8) == 128


def test_a_chunk_ending_mid_prompt_runs_as_rows_and_samples_nothing():
    request = _request("m", 30)
    mid = _prompt(request, 0, 12, 0)
    plan = PlanBuilder(graph_prefill_max_context=32).build(SchedulerOutput([mid]))
    assert plan.graph_bucket == 16 and plan.samples == (False,) and plan.sample_rows() == []
    one = ScheduledChunk(request, 12, 1, _table(0, 13), False)  # 1 token, mid-prompt
    assert _bucket([one]) is None  # a prompt chunk, not a decode: off without graph prefill
    assert _bucket([one], graph_prefill_max_context=32) == 1


def test_short_chunks_run_as_rows_at_any_context_when_allowed():
    """The draft model's catch-up (accepted drafts + bonus, <= k + 1 tokens) at a long context
    runs as rows, as a verification's k + 1 rows do; longer chunks still follow the cap."""
    request = _request("s", 60)
    catch_up = _prompt(request, 57, 3, 0)  # 3 tokens after 57 computed
    assert _bucket([catch_up]) is None  # the target's planner: graph prefill off
    assert _bucket([catch_up], graph_chunk_max_tokens=3) == 4
    assert _bucket([catch_up], graph_chunk_max_tokens=2) is None
    longer = _prompt(_request("l", 60), 50, 10, 20)
    assert _bucket([catch_up, longer], graph_chunk_max_tokens=3) is None
    assert _bucket([catch_up, longer], graph_chunk_max_tokens=3,
                   graph_prefill_max_context=60) == 16
    decodes = [_decode(_request(f"d{i}", 5, 2), 4 * i + 40) for i in range(6)]
    assert _bucket(decodes + [catch_up], graph_chunk_max_tokens=3,
                   graph_prefill_max_rows=8) is None  # 9 rows past the captured rows
    assert _bucket(decodes + [catch_up], graph_chunk_max_tokens=3,
                   graph_prefill_max_rows=16) == 16


def test_the_draft_planner_replays_catch_ups_within_its_captured_rows():
    from engine.spec.draft_model import DraftModelProposer

    proposer = DraftModelProposer(4, lambda plans: [], MAX_LEN, None, 16, graph_rows=40)
    planner = proposer._planner
    assert planner.graph_chunk_max_tokens == 5 and planner.graph_prefill_max_rows == 40
    assert planner.graph_prefill_max_context == 0  # a whole prompt's catch-up runs eagerly
    eager = DraftModelProposer(4, lambda plans: [], MAX_LEN, None, 16)._planner
    assert eager.graph_chunk_max_tokens == 0  # no draft graphs (CPU): nothing changes


def test_the_engine_planner_follows_the_config():
    config = EngineConfig(device="cpu", scheduler=SchedulerConfig(max_num_seqs=8))
    assert graph_rows(config) == 256  # min(512, 2048, largest bucket)
    planner = PlanBuilder.for_engine(config, 16)
    assert planner.graph_prefill_max_context == 512 and planner.graph_prefill_max_rows == 256
    small = EngineConfig(device="cpu", graph_prefill_max_context=100,
                         scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    assert graph_rows(small) == 64
    assert PlanBuilder.for_engine(small, 16).graph_prefill_max_rows == 64
    spec = EngineConfig(device="cpu", graph_prefill_max_context=0,
                        speculative=SpeculativeConfig("ngram", 3),
                        scheduler=SchedulerConfig(max_num_seqs=8))
    assert graph_rows(spec) == 32
    assert PlanBuilder.for_engine(spec, 16).graph_prefill_max_context == 0
    eager = EngineConfig(device="cpu", use_cuda_graphs=False)
    assert PlanBuilder.for_engine(eager, 16).graph_prefill_max_context == 0
    with pytest.raises(ValueError, match="graph_prefill_max_context"):
        EngineConfig(device="cpu", graph_prefill_max_context=-1)


def _mixed_step():
    """A decode whose token is in flight, a verification of 2 drafts, a prompt completed in
    this step (after a cached prefix) and a chunk ending mid-prompt — scheduler order."""
    decode, spec = _request("decode", 6, 1), _request("spec", 5, 2)
    done, mid = _request("done", 11), _request("mid", 20)
    decode.num_inflight_tokens, decode.inflight_row = 1, 3
    chunks = [_decode(decode, 0),
              ScheduledChunk(spec, spec.num_tokens - 1, 3, _table(4, spec.num_tokens + 2),
                             True, (91, 92)),
              _prompt(done, 4, 7, 8), _prompt(mid, 0, 9, 12)]
    return chunks, PlanBuilder(graph_prefill_max_context=32).build(SchedulerOutput(chunks))


def test_mixed_step_rows_fill_the_graph_inputs_and_sample_the_right_rows():
    chunks, plan = _mixed_step()
    assert plan.num_tokens == 1 + 3 + 7 + 9 and plan.graph_bucket == 32
    # decode row, the verification's 3 rows, the completed prompt's last row; not `mid`
    assert plan.sample_rows() == [0, 1, 2, 3, 10]
    tables = BlockTables()
    tables.apply(plan)
    runner = DecodeGraphRunner(model=None, kv_cache=torch.zeros(1), backend=None, block_size=BS,
                               max_model_len=MAX_LEN,
                               sampled_ids=torch.zeros(32, dtype=torch.int64),
                               buckets=(1, 2, 4, 8, 16, 32))
    runner.load_inputs(plan, tables.of(plan), plan.graph_bucket)
    ids, pos, slots, ctx, fed = runner.token_inputs[:, :32].tolist()
    want_pos = [c.start + j for c in chunks for j in range(c.num_tokens)]
    want_tables = [c.block_table for c in chunks for _ in range(c.num_tokens)]
    n = len(want_pos)
    assert pos[:n] == want_pos and ctx[:n] == [p + 1 for p in want_pos]
    assert ids[:n] == list(plan.token_ids) and ids[0] == -1  # the decode's token is in flight
    assert fed[:n] == [3] + [-1] * (n - 1)
    assert slots[:n] == [t[p // BS] * BS + p % BS for t, p in zip(want_tables, want_pos)]
    for row, table in enumerate(want_tables):
        assert runner.block_tables[row, : len(table)].tolist() == table
    assert slots[n:] == [-1] * (32 - n) and ctx[n:] == [1] * (32 - n)


def test_the_eager_step_samples_the_same_rows():
    _, plan = _mixed_step()
    runner = ModelRunner(None, torch.zeros(1), None, BS, CFG.vocab_size, "cpu")
    runner.tables.apply(plan)
    assert runner.prepare(plan).sample_rows.tolist() == plan.sample_rows()


@torch.inference_mode()
def test_graph_rows_compute_the_eager_mixed_steps_logits_and_kv():
    torch.manual_seed(0)
    model = build_model(CFG, torch.float32, "cpu")
    init_random_weights(model, seed=3, std=0.1)
    backend = TorchAttentionBackend()
    chunks, plan = _mixed_step()
    plan = _without_inflight(plan)
    num_blocks = 32
    kv = torch.zeros(CFG.num_layers, num_blocks, 2, BS, CFG.num_kv_heads, CFG.head_dim)
    _fill_context(model, backend, kv, chunks)
    eager_kv, rows_kv = kv.clone(), kv.clone()
    eager = ModelRunner(model, eager_kv, backend, BS, CFG.vocab_size, "cpu")
    want, _ = eager.forward_logits(plan)

    graphs = DecodeGraphRunner(model, rows_kv, backend, BS, MAX_LEN,
                               torch.zeros(32, dtype=torch.int64), buckets=(32,))
    tables = BlockTables()
    tables.apply(plan)
    graphs.load_inputs(plan, tables.of(plan), plan.graph_bucket)
    step, _ = graphs.forward_fn(plan.graph_bucket)
    logits, greedy = step()
    rows = plan.sample_rows()
    torch.testing.assert_close(logits[rows], want, rtol=1e-4, atol=1e-4)
    assert greedy[rows].tolist() == want.argmax(-1).tolist()
    # the padding rows' slot -1 lands in the last block with the torch reference's indexing
    # (the Triton KV write skips it); no request holds that block
    assert max(max(c.block_table) for c in chunks) < num_blocks - 1
    torch.testing.assert_close(rows_kv[:, :-1], eager_kv[:, :-1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(rows_kv[:, :-1], kv[:, :-1])  # the step wrote KV


def _without_inflight(plan):
    """The plan with the decode's in-flight token known (its id is in plan.token_ids)."""
    from dataclasses import replace
    token_ids = (11,) + plan.token_ids[1:]
    return replace(plan, token_ids=token_ids, inflight_rows=(-1,) * plan.num_seqs)


def _fill_context(model, backend, kv, chunks) -> None:
    """KV of every position before each chunk's start, by an eager prefill per request."""
    runner = ModelRunner(model, kv, backend, BS, CFG.vocab_size, "cpu")
    prefixes = [ScheduledChunk(c.request, 0, c.start, c.block_table, False)
                for c in chunks if c.start]
    runner.forward_logits(PlanBuilder().build(SchedulerOutput(prefixes)))


def test_only_leading_decodes_form_the_decode_group():
    """A decode after a verification (its request drafted nothing this step) is not counted
    in num_decodes: the eager runner's decode group is the plan's first num_decodes
    sequences, one token each."""
    first, last = _request("first", 6, 1), _request("last", 7, 1)
    spec = _request("spec", 5, 2)
    chunks = [_decode(first, 0),
              ScheduledChunk(spec, spec.num_tokens - 1, 3, _table(4, spec.num_tokens + 2),
                             True, (91, 92)),
              _decode(last, 8)]
    plan = PlanBuilder().build(SchedulerOutput(chunks))
    assert plan.num_decodes == 1 and plan.query_lens == (1, 3, 1)
    runner = ModelRunner(None, torch.zeros(1), None, BS, CFG.vocab_size, "cpu")
    runner.tables.apply(plan)
    meta = runner.prepare(plan).attn_meta
    assert meta.decode.query_start.tolist() == [0, 1]
    assert meta.prefill.query_start.tolist() == [0, 3, 4]
