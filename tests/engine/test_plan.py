"""The step plan between the engine core and its executor: plain data only, block tables as
deltas that keep the executor's copy exact through growth, preemption and frees."""

from __future__ import annotations

import pickle
import random

from engine.plan import BlockTables, PlanBuilder, StepPlan
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from tests.engine.test_scheduler import make_request, make_scheduler

_PLAIN = (int, float, str, bool, type(None))


def _only_plain_data(value) -> bool:
    """Ints, floats, strings, tuples and frozen plan dataclasses: nothing live crosses."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, tuple):
        return all(_only_plain_data(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return all(_only_plain_data(getattr(value, f)) for f in value.__dataclass_fields__)
    return False


def test_plan_is_plain_data_and_pickles():
    sched = make_scheduler()
    for i in range(3):
        sched.add(make_request(f"r{i}", 5 + i))
    planner = PlanBuilder()
    plan = planner.build(sched.schedule(), sched.kv.take_freed())
    assert isinstance(plan, StepPlan) and _only_plain_data(plan)
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.query_lens == (5, 6, 7) and len(plan.token_ids) == 18
    assert [u.first_index for u in plan.block_updates] == [0, 0, 0]
    assert plan.graph_bucket is None  # prefill: no decode graph


def test_deltas_send_only_new_blocks_and_graph_buckets_for_decodes():
    sched = make_scheduler(block_size=4)
    sched.add(make_request("a", 4, max_tokens=20))
    planner, tables = PlanBuilder(max_blocks_per_seq=3), BlockTables()
    seen = []
    for _ in range(10):
        out = sched.schedule()
        plan = planner.build(out, sched.kv.take_freed())
        tables.apply(plan)
        assert tables.of(plan) == [c.block_table for c in out.chunks]
        seen.append((plan.block_updates, plan.graph_bucket))
        sched.on_step_done(out)
        out.chunks[0].request.output_token_ids.append(1)
    first_update = seen[0][0][0]
    assert first_update.first_index == 0 and len(first_update.block_ids) == 1
    grown = [u for updates, _ in seen[1:] for u in updates]
    assert [u.first_index for u in grown] == [1, 2, 3]  # a block at a time, when needed
    buckets = [b for _, b in seen]
    assert buckets[0] is None and buckets[1:9] == [1] * 8
    assert buckets[9] is None  # the table outgrew max_blocks_per_seq: no graph


def test_executor_tables_follow_the_scheduler_through_preemption_and_frees():
    """Random traffic on a pool small enough to preempt: after every plan the executor's
    copy equals the scheduler's tables, and freed requests leave it."""
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=24, block_size=4, budget=16, max_seqs=6)
    planner, tables = PlanBuilder(), BlockTables()
    next_id, freed_total, replaced, planned = 0, 0, 0, set()
    for _ in range(400):
        if rng.random() < 0.6:
            sched.add(make_request(f"r{next_id}", rng.randrange(1, 20), rng.randrange(1, 30)))
            next_id += 1
        out = sched.schedule()
        freed = sched.kv.take_freed()
        freed_total += len(freed)
        plan = planner.build(out, freed)
        tables.apply(plan)
        replaced += sum(1 for u in plan.block_updates if u.first_index == 0)
        planned.update(plan.request_ids)
        assert tables.of(plan) == [c.block_table for c in out.chunks]
        sched.on_step_done(out)
        for c in out.chunks:
            r = c.request
            if c.samples:
                r.output_token_ids.append(3)
                if len(r.output_token_ids) >= r.params.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    assert sched.num_preemptions > 0 and freed_total > 0 and replaced > len(planned)  # preempted tables resent whole
    for r in list(sched.running) + list(sched.waiting):
        sched.finish(r, RequestStatus.FINISHED_ABORTED)
    tables.apply(planner.build(SchedulerOutput(), sched.kv.take_freed()))
    assert len(tables) == 0 and sched.kv.is_idle()


def test_sampling_rows_carry_seed_step_and_history_only_with_a_penalty():
    sched = make_scheduler()
    plain = make_request("plain", 3)
    penal = make_request("penal", 3)
    penal.params = SamplingParams(max_tokens=4, repetition_penalty=1.3, temperature=0.7, seed=9)
    penal.seed = 9
    planner = PlanBuilder()
    sched.add(plain)
    rows = planner.build(sched.schedule()).sampling
    assert rows[0].token_history is None and rows[0].step == 0
    sched.add(penal)
    out = sched.schedule()
    rows = planner.build(out).sampling
    assert [r.seed for r in rows] == [0, 9] and rows[1].token_history == (1, 2, 3)
    assert rows[0].token_history == (1, 2, 3)  # a penalty in the batch: every row's history
    assert not rows[1].is_greedy and rows[1].repetition_penalty == 1.3
