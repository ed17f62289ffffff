"""Scheduler and block bookkeeping, without any model: plans, budgets, preemption, leaks."""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.block_table import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import QueueFullError, Scheduler


def make_request(rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   seed=0, max_model_len=4096)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True, queue=None):
    kv = KVCacheManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_chunked_prefill=chunked, max_queued_requests=queue)
    return Scheduler(cfg, kv)


def run_step(sched: Scheduler, token: int = 7):
    """Pretend the runner ran the plan: advance progress and append a token to samplers."""
    plan = sched.schedule()
    sched.on_step_done(plan)
    for c in plan.chunks:
        if c.samples:
            c.request.output_token_ids.append(token)
    return plan


def test_block_pool_refcounts_and_double_free():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    pool.incref(ids[:1])
    pool.free(ids)
    assert pool.num_free_blocks == 3  # the shared block still has one holder
    pool.free(ids[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(ids[:1])
    with pytest.raises(MemoryError):
        pool.allocate(5)


def test_prefill_then_decode_plan():
    sched = make_scheduler()
    r = make_request("a", 10)
    sched.add(r)
    plan = run_step(sched)
    assert [(c.start, c.num_tokens, c.samples) for c in plan.chunks] == [(0, 10, True)]
    assert len(plan.chunks[0].block_table) == 3  # 10 tokens / 4 per block
    plan = run_step(sched)
    assert [(c.start, c.num_tokens, c.is_decode) for c in plan.chunks] == [(10, 1, True)]


def test_chunked_prefill_respects_budget_and_decodes_first():
    sched = make_scheduler(budget=8)
    a, b = make_request("a", 3), make_request("b", 20)
    sched.add(a)
    run_step(sched)  # a prefilled
    sched.add(b)
    plan = run_step(sched)
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 7)]
    assert not plan.chunks[1].samples
    starts = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        plan = run_step(sched)
        starts += [c.start for c in plan.chunks if c.request is b]
    assert starts == [7, 14]  # 7 + 7 + 6 = 20, each step sharing budget with a's decode
    assert len(b.output_token_ids) == 1


def test_no_chunking_waits_for_budget():
    sched = make_scheduler(budget=8, chunked=False)
    sched.add(make_request("big", 20))
    assert sched.schedule().is_empty


def test_preemption_frees_and_recomputes():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a, b = make_request("a", 8), make_request("b", 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 + 2 blocks (9 tokens needs 3 each soon)
    for _ in range(8):
        plan = run_step(sched)
        if plan.preempted_ids:
            break
    assert plan.preempted_ids == ["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    plan = run_step(sched)
    (chunk,) = plan.chunks
    assert chunk.request is b and chunk.start == 0 and chunk.samples
    assert chunk.num_tokens == b.num_tokens - 1  # prompt + outputs so far, recomputed at once
    sched.finish(b, RequestStatus.FINISHED_STOPPED)
    assert sched.kv.is_idle()


def test_abort_anywhere_frees_blocks():
    sched = make_scheduler(budget=8)
    reqs = [make_request(str(i), 10) for i in range(3)]
    for r in reqs:
        sched.add(r)
    run_step(sched)  # first partially prefilled, others waiting
    for r in reqs:
        sched.finish(r, RequestStatus.FINISHED_ABORTED)
        sched.finish(r, RequestStatus.FINISHED_ABORTED)  # idempotent
    assert not sched.has_unfinished()
    assert sched.kv.is_idle()


def test_max_num_seqs_and_queue_bound():
    sched = make_scheduler(max_seqs=2, queue=3)
    for i in range(3):
        sched.add(make_request(str(i), 2))
    with pytest.raises(QueueFullError):
        sched.add(make_request("x", 2))
    plan = run_step(sched)
    assert len(plan.chunks) == 2


def test_detach_keeps_blocks_for_transfer():
    sched = make_scheduler()
    r = make_request("a", 10)
    sched.add(r)
    run_step(sched)
    table = sched.detach(r)
    assert len(table) == 3 and not sched.has_unfinished()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks - 3
    sched.kv.free("a")
    assert sched.kv.is_idle()


# ---- prefilled requests (KV received from a prefill instance) ------------------------------
def make_prefilled(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int = 8) -> Request:
    """A request as a decode instance admits it: prompt blocks held, first token recorded."""
    r = make_request(rid, prompt_len, max_tokens)
    sched.kv.grow(rid, prompt_len)
    r.num_computed_tokens = prompt_len
    r.output_token_ids.append(7)
    sched.add_prefilled(r)
    return r


def drain(sched: Scheduler, max_steps: int = 500) -> list:
    """Step until every request finishes by length; returns the plans."""
    plans = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return plans
        plan = run_step(sched)
        plans.append(plan)
        for r in [c.request for c in plan.chunks if c.samples]:
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
    raise AssertionError(f"not finished after {max_steps} steps: running {len(sched.running)}, "
                         f"prefilled {len(sched.prefilled)}, waiting {len(sched.waiting)}")


def test_prefilled_never_exceed_max_num_seqs():
    sched = make_scheduler(num_blocks=400, max_seqs=4, budget=32)
    reqs = [make_prefilled(sched, f"p{i}", 5) for i in range(30)]
    assert sched.num_waiting == 30 and sched.has_unfinished()
    plans = drain(sched)
    assert max(len(p.chunks) for p in plans) == 4
    assert all(c.is_decode for p in plans for c in p.chunks)  # KV was never recomputed
    assert all(len(r.output_token_ids) == 8 for r in reqs)
    assert sched.kv.is_idle()


def test_prefilled_admitted_before_waiting_and_within_budget():
    sched = make_scheduler(max_seqs=8, budget=3)
    sched.add(make_request("w", 4))
    for i in range(4):
        make_prefilled(sched, f"p{i}", 4)
    plan = run_step(sched)
    assert [c.request.request_id for c in plan.chunks] == ["p0", "p1", "p2"]
    assert len(plan.chunks[0].block_table) == 2  # the next block grown on admission
    assert [r.request_id for r in sched.waiting] == ["w"]


def test_aborting_a_queued_prefilled_request_frees_its_blocks():
    sched = make_scheduler(max_seqs=1)
    make_prefilled(sched, "a", 6)
    b = make_prefilled(sched, "b", 6)
    run_step(sched)
    assert b in sched.prefilled and len(sched.kv.block_table("b")) == 2
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not sched.kv.block_table("b") and b not in sched.prefilled
    drain(sched)
    assert sched.kv.is_idle()


def test_detach_takes_a_prefilled_request_out():
    sched = make_scheduler()
    r = make_prefilled(sched, "a", 6)
    assert len(sched.detach(r)) == 2 and not sched.has_unfinished()
    sched.kv.free("a")
    assert sched.kv.is_idle()


def test_add_prefilled_rejects_a_request_without_its_kv():
    with pytest.raises(ValueError, match="not prefilled"):
        make_scheduler().add_prefilled(make_request("a", 4))


def test_tight_kv_prefilled_requests_cannot_deadlock():
    # 10 blocks of 4; each prompt of 8 holds 2 blocks, so 5 queued requests hold every block and
    # none can grow its next one: the scheduler must preempt some to recompute, not stall.
    sched = make_scheduler(num_blocks=10, block_size=4, max_seqs=8, budget=64)
    reqs = [make_prefilled(sched, f"p{i}", 8, max_tokens=6) for i in range(5)]
    assert sched.kv.num_free_blocks == 0
    plans = drain(sched)
    assert sum(len(p.preempted_ids) for p in plans) > 0
    assert all(len(r.output_token_ids) == 6 for r in reqs)
    assert sched.kv.is_idle()


def test_running_requests_preempt_queued_prefilled_first():
    sched = make_scheduler(num_blocks=5, block_size=4, max_seqs=1, budget=64)
    a = make_prefilled(sched, "a", 7)  # 2 blocks now; 15 tokens (4 blocks) at the end
    b = make_prefilled(sched, "b", 8)  # 2 blocks, queued behind a (one batch slot)
    plan = run_step(sched)
    while not plan.preempted_ids:  # a takes the free block, then needs b's
        plan = run_step(sched)
        assert a in sched.running
    assert plan.preempted_ids == ["b"] and b in sched.waiting and b.num_computed_tokens == 0
    drain(sched)
    assert sched.kv.is_idle()
