"""Speculative decoding with a draft model (engine/spec/draft_model.py) on tiny random Llamas.

Outputs are plain decoding's token for token, greedy and seeded, whatever the draft. A draft
identical to the target must have every draft accepted: that only holds if the draft's own KV
cache, its positions and its catch-up after every verification, preemption and hand-off are
right (a stale or shifted draft KV makes it disagree with the target). Every block is back
after every scenario."""

from __future__ import annotations


import pytest
import torch

from engine.config import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig,
                           SpeculativeConfig)
from engine.llm_engine import LLMEngine
from engine.plan import PlanBuilder
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks

SEED = 5
GREEDY_1 = SamplingParams(max_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("draft")
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return {
        "target": str(save_tiny_hf_model(root / "target", "llama", seed=8)),
        "small": str(save_tiny_hf_model(root / "small", "llama", seed=3, extra_config=small)),
        "short": str(save_tiny_hf_model(root / "short", "llama", seed=8,
                                        extra_config={"max_position_embeddings": 40})),
        "other_vocab": str(save_tiny_hf_model(root / "vocab", "llama", seed=1,
                                              extra_config={"vocab_size": 49160})),
    }


def _engine(models, draft: str | None, num_blocks: int = 256, budget: int = 512,
            k: int = 4, async_scheduling: bool = False, prefix_caching: bool = True,
            catch_up: int | None = None) -> LLMEngine:
    spec = (SpeculativeConfig(method="draft_model", draft_model=models[draft],
                              num_speculative_tokens=k, max_batch_size=16, adaptive=False,
                              max_catch_up_tokens=catch_up)
            if draft else SpeculativeConfig())
    return LLMEngine(EngineConfig(
        model=models["target"], device="cpu", attention_backend="torch",
        async_scheduling=async_scheduling,
        cache=CacheConfig(block_size=4, num_blocks=num_blocks,
                          enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
        speculative=spec))


@pytest.fixture(scope="module")
def plain(models) -> LLMEngine:
    return _engine(models, None)


@pytest.fixture(scope="module")
def self_draft(models) -> LLMEngine:
    """The target drafting for itself."""
    return _engine(models, "target")


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (37 * j + 11 * i) % 400 for i in range(5 + 4 * j)] for j in range(n)]


def _params(sampled: bool, n: int) -> list[SamplingParams]:
    if not sampled:
        return [SamplingParams(max_tokens=14 + 3 * (i % 3), temperature=0.0, ignore_eos=True)
                for i in range(n)]
    # the tiny model's logits spread ~0.16: a low temperature keeps the draws dependent on
    # them (near-uniform rows would make any draft sharing the noise agree)
    return [SamplingParams(max_tokens=10, temperature=0.05, top_k=20, seed=SEED + i,
                           logprobs=i % 2 == 0, ignore_eos=True) for i in range(n)]


def _generate(engine: LLMEngine, prompts, params):
    outs = engine.generate(prompts, params)
    assert_no_leaks(engine)
    return outs


def _snapshot(engine: LLMEngine) -> tuple[int, int]:
    """(drafted, accepted) so far."""
    return engine.spec.stats.num_draft_tokens, engine.spec.stats.num_accepted_tokens


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_self_draft_is_plain_and_always_accepted(plain, self_draft, sampled):
    """Six concurrent requests of different lengths: plain's tokens (and logprobs), and every
    draft kept — each is sampled with the verifier's own noise, from the same logits."""
    prompts = _prompts(6)
    want = _generate(plain, prompts, _params(sampled, 6))
    before = _snapshot(self_draft)
    got = _generate(self_draft, prompts, _params(sampled, 6))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, rel=1e-4, abs=1e-5)
    drafted, accepted = (a - b for a, b in zip(_snapshot(self_draft), before))
    assert drafted > 0 and accepted == drafted


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_other_draft_keeps_plain_outputs(models, plain, sampled):
    """A smaller random draft mostly drafts wrong: outputs do not change, async on."""
    prompts = _prompts(3)
    want = [o.token_ids for o in _generate(plain, prompts, _params(sampled, 3))]
    spec = _engine(models, "small", async_scheduling=True)
    assert [o.token_ids for o in _generate(spec, prompts, _params(sampled, 3))] == want
    stats = spec.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens


def _token_kv(kv_cache, block_ids: list[int], num_tokens: int):
    """[layers, 2, tokens, heads, head_dim]: the first tokens' K and V, in position order."""
    blocks = kv_cache[:, block_ids]  # [L, nb, 2, bs, H, D]
    kv = blocks.permute(0, 2, 1, 3, 4, 5).flatten(2, 3)
    return kv[:, :, :num_tokens]


def test_draft_kv_is_the_drafts_prefill_kv(models):
    """Whatever was rejected and rolled back: after every step, the draft KV a running request
    counts as valid equals what the draft model computes by prefilling those tokens."""
    spec = _engine(models, "small")
    reference = LLMEngine(EngineConfig(
        model=models["small"], device="cpu", attention_backend="torch",
        cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=False)))
    for prompt, params in zip(_prompts(3), _params(False, 3)):
        spec.add_request(prompt, params)
    checked = 0
    while spec.has_unfinished():
        spec.step()
        for request in spec.scheduler.running:
            valid = min(request.num_draft_computed_tokens, request.num_computed_tokens)
            if valid < 2:
                continue
            kv, _ = _prefill(reference, "ref", request.all_token_ids[:valid], GREEDY_1)
            want = _token_kv(kv, list(range(kv.shape[1])), valid)
            got = _token_kv(spec.executor.drafter.kv_cache,
                            spec.kv_manager.block_table(request.request_id), valid)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            checked += 1
    stats = spec.spec.stats
    assert checked > 10 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leaks(spec)
    assert_no_leaks(reference)


def _scribble_free_blocks(engine: LLMEngine) -> None:
    """Noise into the draft cache of every block no request holds, as reuse by other requests
    would leave it (prefix caching off: a free block holds nothing anyone may read)."""
    held = _held_blocks(engine)
    free = [b for b in range(engine.kv_manager.num_blocks) if b not in held]
    cache = engine.executor.drafter.kv_cache
    cache[:, free] = torch.randn_like(cache[:, free])


def test_preemption_recomputes_the_draft_too(models, plain):
    """20 blocks of 4 for 4 requests of 29-45 tokens and a 16-token budget: preemptions of
    requests that have drafted, and chunked prefill. A preempted request's draft KV is gone
    with its blocks (scribbled over here after every step); it catches up from scratch, so
    every draft is still accepted."""
    prompts = _prompts(4)
    params = [SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)] * 4
    want = [o.token_ids for o in _generate(plain, prompts, params)]
    spec = _engine(models, "target", num_blocks=20, budget=16, prefix_caching=False)
    ids = [spec.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {rid: [] for rid in ids}
    while spec.has_unfinished():
        for out in spec.step():
            tokens[out.request_id] += out.new_token_ids
        _scribble_free_blocks(spec)
    assert [tokens[rid] for rid in ids] == want
    assert spec.scheduler.num_preemptions > 0
    stats = spec.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert_no_leaks(spec)


def _held_blocks(engine: LLMEngine) -> set[int]:
    return {b for r in engine.scheduler.running + list(engine.scheduler.waiting)
            for b in engine.kv_manager.block_table(r.request_id)}


@pytest.mark.parametrize("draft", ["target", "small"])
def test_drafting_writes_only_blocks_the_request_holds(models, plain, draft):
    """Before every step the draft cache of every free block is set to a sentinel; a block
    free before and after the step still holds it: the drafts' KV (positions up to n + k - 2,
    across block boundaries at block size 4) went only into blocks their request held — a
    position past its table would land in the table's zero padding, block 0. Async on."""
    prompts = _prompts(4)
    params = _params(False, 4)
    want = [o.token_ids for o in _generate(plain, prompts, params)]
    spec = _engine(models, draft, num_blocks=64, prefix_caching=False, async_scheduling=True)
    cache = spec.executor.drafter.kv_cache
    ids = [spec.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {rid: [] for rid in ids}
    while spec.has_unfinished():
        free_before = set(range(spec.kv_manager.num_blocks)) - _held_blocks(spec)
        cache[:, sorted(free_before)] = 7.0
        for out in spec.step():
            tokens[out.request_id] += out.new_token_ids
        untouched = sorted(free_before - _held_blocks(spec))
        assert bool((cache[:, untouched] == 7.0).all())
    assert [tokens[rid] for rid in ids] == want
    stats = spec.spec.stats
    assert stats.num_draft_tokens > 0
    if draft == "target":  # async scheduling changes nothing the draft sees
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert_no_leaks(spec)


def test_abort_mid_generation(plain, self_draft):
    prompts = _prompts(4)
    params = _params(False, 4)
    want = [o.token_ids for o in _generate(plain, prompts, params)]
    ids = [self_draft.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {rid: [] for rid in ids}
    steps = 0
    while self_draft.has_unfinished():
        for out in self_draft.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
        if steps == 4:
            assert self_draft.abort(ids[1]) is not None
    assert [tokens[rid] for rid in ids if rid != ids[1]] == want[:1] + want[2:]
    assert 0 < len(tokens[ids[1]]) < len(want[1])
    assert_no_leaks(self_draft)


def _prefill(engine: LLMEngine, request_id: str, prompt, params):
    """The prompt's KV and first token, computed as a prefill instance does."""
    engine.scheduler.add(engine.make_request(prompt, params, request_id, seed=SEED))
    scheduled = engine.scheduler.schedule()
    sampled = engine.runner.execute(PlanBuilder().build(scheduled, engine.kv_manager.take_freed()))
    engine.scheduler.on_step_done(scheduled)
    chunk, = scheduled.chunks
    kv = engine.kv_cache[:, chunk.block_table].clone()
    engine.scheduler.finish(chunk.request, RequestStatus.FINISHED_LENGTH)
    return kv, int(sampled.token_ids[0])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_handed_off_request_drafts_right_from_the_first_step(models, plain, sampled):
    """KV landed from a prefill instance (the target's only: the draft cache of those blocks
    holds zeros): the first drafting step catches the draft up on the whole prompt, so with
    the target as its own draft every draft is accepted from the first verification on."""
    prompt = _prompts(6)[5]
    params = _params(sampled, 1)[0]
    full = _run(plain, plain.make_request(prompt, params, seed=SEED))
    prefill = _engine(models, None)
    kv, first = _prefill(prefill, "r", prompt, params)
    decode = _engine(models, "target")
    request = decode.make_request(prompt, params, "r", seed=SEED)
    blocks = decode.reserve_blocks("r", request.num_tokens)
    decode.kv_cache[:, blocks] = kv
    decode.track(request)
    tokens = decode.record_token(request, first, None).new_token_ids
    decode.admit_prefilled(request)
    first_verified = None
    while decode.has_unfinished():
        for out in decode.step():
            tokens += out.new_token_ids
        if first_verified is None and decode.spec.stats.num_draft_tokens:
            first_verified = _snapshot(decode)
    assert tokens == full
    assert first_verified is not None and first_verified[0] == first_verified[1] > 0
    stats = decode.spec.stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert_no_leaks(decode)
    assert_no_leaks(prefill)


def _run(engine: LLMEngine, request) -> list[int]:
    """A request built by `make_request`, alone to the end: its new tokens."""
    engine.track(request)
    engine.enqueue(request)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert_no_leaks(engine)
    return tokens


def test_resumed_request_drafts_after_its_recompute(self_draft, plain):
    """A migrated request (outputs already streamed): recomputed, then drafted as usual."""
    prompt = _prompts(3)[2]
    params = _params(True, 1)[0]
    full = _run(plain, plain.make_request(prompt, params, seed=SEED))
    before = _snapshot(self_draft)
    resumed = self_draft.make_request(prompt, params, seed=SEED, output_token_ids=full[:5])
    assert _run(self_draft, resumed) == full[5:]
    drafted, accepted = (a - b for a, b in zip(_snapshot(self_draft), before))
    assert drafted > 0 and accepted == drafted


def test_drafting_stops_past_the_drafts_context(models, plain):
    """A draft with a 40-token context (its rotary table ends there: an input past position 39
    would raise): drafting stops short of it, the requests go on; outputs unchanged."""
    prompts = [_prompts(8)[7], _prompts(2)[1]]  # 33 and 9 tokens
    params = _params(False, 2)
    want = [o.token_ids for o in _generate(plain, prompts, params)]
    spec = _engine(models, "short")
    assert spec.executor.drafter.max_model_len == 40
    assert [o.token_ids for o in _generate(spec, prompts, params)] == want
    assert spec.spec.stats.num_draft_tokens > 0


def test_config_refusals(models):
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="ngram", draft_model=models["small"])
    with pytest.raises(ValueError, match=r"draft_model .*vocab_size 49160"):
        _engine(models, "other_vocab")
    with pytest.raises(ValueError, match="draft_model needs a one-rank instance"):
        EngineConfig(device="cpu", parallel=ParallelConfig(tensor_parallel_size=2),
                     speculative=SpeculativeConfig("draft_model", draft_model=models["small"]))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_catch_up_is_bounded_per_step(models, plain, sampled):
    """A 45-token prompt and a 5-token one, 8 catch-up tokens per step: the short one drafts
    from its first decode step on; the long one decodes plainly while its catch-up advances
    (at most what the short one leaves of the 8), and drafts once the rest fits. Every round
    within the budget; plain's tokens, every draft of the target drafting itself accepted
    (so the draft KV computed in pieces is right)."""
    prompts = [_prompts(11)[10], _prompts(1)[0]]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **(
        dict(temperature=0.05, top_k=20, seed=SEED + i) if sampled else dict(temperature=0.0)))
        for i in range(2)]
    want = [o.token_ids for o in _generate(plain, prompts, params)]
    spec = _engine(models, "target", catch_up=8)
    catch_up = spec.spec.proposer.stats
    long, short = (spec.make_request(p, sp) for p, sp in zip(prompts, params))
    for request in (long, short):
        spec.track(request)
        spec.enqueue(request)
    growth: dict[str, list[int]] = {long.request_id: [], short.request_id: []}
    long_progress = []  # the long one's draft KV before each of its decode steps
    while spec.has_unfinished():
        before = {r.request_id: len(r.output_token_ids) for r in (long, short)}
        if long.output_token_ids:
            long_progress.append(long.num_draft_computed_tokens)
        spec.step()
        assert catch_up.last_step_tokens <= 8
        for r in (long, short):
            if before[r.request_id]:  # decode steps only (the first token is the prefill's)
                growth[r.request_id].append(len(r.output_token_ids) - before[r.request_id])
    assert [long.output_token_ids, short.output_token_ids] == want
    assert growth[short.request_id][0] > 1  # drafted (and all kept) at once
    first_draft = next(i for i, g in enumerate(growth[long.request_id]) if g > 1)
    assert first_draft >= 45 // 8 - 1  # it could not catch up sooner
    assert all(g == 1 for g in growth[long.request_id][:first_draft])
    assert long_progress[:first_draft + 1] == sorted(long_progress[:first_draft + 1])
    assert long_progress[first_draft] + 8 >= 45 + first_draft + 1  # the rest fit that round
    assert catch_up.max_step_tokens <= 8 and catch_up.num_deferred >= first_draft
    stats = spec.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert_no_leaks(spec)
    with pytest.raises(ValueError, match=r"max_catch_up_tokens must be >= 2 .*got 1"):
        SpeculativeConfig("draft_model", draft_model=models["small"], max_catch_up_tokens=1)


def test_decode_pool_draft_model_reaches_the_engine(models):
    from cluster.config import cluster_config_from_dict
    from cluster.pools import worker_specs

    cfg = cluster_config_from_dict({"model": "tiny", "decode": {
        "speculative_method": "draft_model", "draft_model": models["small"],
        "num_speculative_tokens": 3}})
    _, decode = worker_specs(cfg, "127.0.0.1")
    spec = decode[0].engine.speculative
    assert (spec.method, spec.draft_model, spec.num_speculative_tokens) == (
        "draft_model", models["small"], 3)
    with pytest.raises(ValueError, match="draft_model"):
        cluster_config_from_dict({"model": "tiny", "prefill": {"draft_model": "default"}})
    with pytest.raises(ValueError, match="draft_model"):
        cluster_config_from_dict({"model": "tiny", "decode": {"speculative_method": "draft_model"}})
