"""Speculative verification steps in the decode CUDA graphs (engine/cuda_graphs.py `_rows`): a
request's last token and its k drafts run as k + 1 decode rows of growing context.

On the CPU: the plan's bucket counts rows, and the graphs' static inputs hold one row per token
(ids, positions, slots, context lengths, the request's block table on each of its rows, the
in-flight row only on a plain decode's row). On CUDA: speculative greedy decoding through the
graphs gives plain greedy's tokens, and a verification bucket larger than the batch was
captured and replayed."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import DecodeGraphRunner
from engine.plan import BlockTables, PlanBuilder
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from tests.gpu_tokenizer import default_tokenizer_or_skip

BS = 4


def _request(rid: str, prompt_len: int, outputs: int) -> Request:
    r = Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=100), 0, 1 << 20)
    r.output_token_ids.extend(range(50, 50 + outputs))
    return r


def _table(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BS)))


def test_verification_rows_fill_the_graph_inputs():
    plain = _request("plain", 6, 2)  # decodes its last token, which is in flight
    plain.num_inflight_tokens, plain.inflight_row = 1, 5
    spec = _request("spec", 5, 3)  # last token + 3 drafts
    drafts = (91, 92, 93)
    t_plain = _table(0, plain.num_tokens)
    t_spec = _table(10, spec.num_tokens + len(drafts))
    chunks = [ScheduledChunk(plain, plain.num_tokens - 1, 1, t_plain, True),
              ScheduledChunk(spec, spec.num_tokens - 1, 1 + len(drafts), t_spec, True, drafts)]
    plan = PlanBuilder().build(SchedulerOutput(chunks))
    assert plan.spec_lens == (0, 3) and plan.num_tokens == 5
    assert plan.graph_bucket == 8  # rows, not requests
    tables = BlockTables()
    tables.apply(plan)
    runner = DecodeGraphRunner(model=None, kv_cache=torch.zeros(1), backend=None, block_size=BS,
                               max_model_len=256, sampled_ids=torch.zeros(8, dtype=torch.int64),
                               buckets=(1, 2, 4, 8))
    runner.load_inputs(plan, tables.of(plan), plan.graph_bucket)
    ids, pos, slots, ctx, fed = runner.token_inputs[:, :8].tolist()
    p0 = plain.num_tokens - 1
    s0 = spec.num_tokens - 1
    want_pos = [p0] + [s0 + j for j in range(4)]
    assert pos[:5] == want_pos and ctx[:5] == [p + 1 for p in want_pos]
    assert ids[:5] == [-1, spec.token_at(s0), *drafts]  # -1: the plan's id of a token in flight
    assert fed[:5] == [5, -1, -1, -1, -1]
    want_tables = [t_plain] + [t_spec] * 4
    assert slots[:5] == [t[p // BS] * BS + p % BS for t, p in zip(want_tables, want_pos)]
    for row, table in enumerate(want_tables):
        assert runner.block_tables[row, : len(table)].tolist() == table
    assert slots[5:] == [-1] * 3 and ctx[5:] == [1] * 3 and fed[5:] == [-1] * 3


def test_a_prompt_chunk_or_too_many_rows_takes_no_graph():
    spec = _request("spec", 5, 3)
    prompt = _request("prompt", 9, 0)
    table = _table(0, 64)
    mixed = [ScheduledChunk(spec, spec.num_tokens - 1, 3, table, True, (1, 2)),
             ScheduledChunk(prompt, 0, 9, _table(20, 9), True)]
    assert PlanBuilder().build(SchedulerOutput(mixed)).graph_bucket is None
    wide = [ScheduledChunk(_request(f"r{i}", 5, 3), 7, 5, table, True, (1, 2, 3, 4))
            for i in range(3)]  # 15 rows: beyond the largest bucket below
    assert PlanBuilder(buckets=(1, 2, 4, 8)).build(SchedulerOutput(wide)).graph_bucket is None
    assert PlanBuilder(buckets=(1, 2, 4, 8, 16)).build(SchedulerOutput(wide)).graph_bucket == 16


@pytest.mark.gpu
def test_speculative_greedy_in_graphs_equals_plain(cuda, tmp_path, monkeypatch):
    default_tokenizer_or_skip(monkeypatch)
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
    from engine.llm_engine import LLMEngine
    from tests.engine.factories import save_tiny_hf_model

    model = str(save_tiny_hf_model(tmp_path / "llama", "llama", seed=5))
    # repetitive prompts: the n-gram proposer finds drafts, some right, some wrong
    prompts = [[7 + (i % period) for i in range(40)] for period in (3, 5, 7)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def engine(speculative: SpeculativeConfig) -> LLMEngine:
        return LLMEngine(EngineConfig(
            model=model, device="cuda", dtype="float32", speculative=speculative,
            cache=CacheConfig(block_size=16, num_blocks=64),
            scheduler=SchedulerConfig(max_num_seqs=4)))

    plain = [o.token_ids for o in engine(SpeculativeConfig()).generate(prompts, params)]
    spec_engine = engine(SpeculativeConfig("ngram", 3, adaptive=False))
    graphs = spec_engine.runner.decode_graphs
    assert graphs is not None
    replayed = []  # the row counts of verification steps the graphs ran
    run = graphs.run

    def counting_run(plan, tables):
        if plan.spec_lens:
            replayed.append(plan.num_tokens)
        return run(plan, tables)

    monkeypatch.setattr(graphs, "run", counting_run)
    got = [o.token_ids for o in spec_engine.generate(prompts, params)]
    assert got == plain
    assert replayed and max(replayed) > len(prompts), replayed  # rows beyond the batch
    stats = spec_engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0, stats
