"""A decode worker under a burst, Ray-free and without a transfer channel: each arrival is a
reservation, its prompt's KV (computed by a colocated engine) written into the reserved blocks as
a receive link would, and the prefill's real first token. The running batch never exceeds
max_num_seqs, the rest wait in the decode queue, the queue is bounded, outputs equal a plain
engine's and every block is back at the end."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine.plan import PlanBuilder
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.helpers import build_engine

pytestmark = pytest.mark.timeout(300)
SEED = 7


def reserve_request(request_id: str, prompt: list[int], params: SamplingParams):
    return worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, num_prompt_tokens=len(prompt),
        prompt_token_ids=prompt, sampling=sampling_to_proto(params), seed=SEED)


def land(decode: DecodeWorker, request_id: str, kv: torch.Tensor | None, first_token: int) -> None:
    """What a receive link and the prefill instance deliver: the KV, then the first token."""
    if kv is not None:
        decode.engine.kv_cache[:, decode._blocks_of(request_id)] = kv
    decode._transfers.begin(request_id)  # as `expect` does: one shard, from rank 0
    decode._transfers.rank0_done(request_id,
                                 worker_pb2.TransferResult(status=worker_pb2.TRANSFER_STATUS_OK))
    decode.first_token(worker_pb2.TokenDelta(protocol_version=PROTOCOL_VERSION,
                                             request_id=request_id, token_ids=[first_token]))


def prefill_steps(engine, prompts: dict[str, list[int]], params: SamplingParams):
    """Run the prompts through `engine` as a prefill instance does; after each step, yield
    (request_id, its prompt KV, its first token) for every prompt that step completed."""
    for request_id, prompt in prompts.items():
        engine.scheduler.add(engine.make_request(prompt, params, request_id, seed=SEED))
    planner = PlanBuilder()
    while engine.scheduler.has_unfinished():
        plan = engine.scheduler.schedule()
        sampled = engine.runner.execute(planner.build(plan, engine.kv_manager.take_freed()))
        engine.scheduler.on_step_done(plan)
        done = [c for c in plan.chunks if c.samples]
        for chunk, token_id in zip(done, sampled.token_ids.tolist() if done else []):
            yield chunk.request.request_id, engine.kv_cache[:, chunk.block_table].clone(), token_id
            engine.scheduler.finish(chunk.request, RequestStatus.FINISHED_LENGTH)


def collect(outputs: queue.Queue, request_ids: set[str], timeout_s: float = 240.0):
    """Every token each request streams until it finishes (or gets an error)."""
    tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
    ended: dict[str, worker_pb2.TokenDelta] = {}
    deadline = time.monotonic() + timeout_s
    while len(ended) < len(request_ids):
        batch = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
        for delta in batch.deltas:
            tokens[delta.request_id] += delta.token_ids
            if delta.finish_reason or delta.error:
                ended[delta.request_id] = delta
    return tokens, ended


def watch_batches(engine) -> list[int]:
    """Record the running batch's size after each plan."""
    sizes: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        sizes.append(len(engine.scheduler.running))
        return plan

    engine.scheduler.schedule = recording_schedule
    return sizes


def test_burst_of_300_stays_within_max_num_seqs_and_matches_generate(default_loaded):
    # 300 arrivals of 30 distinct prompts (prefilled once each, to keep the test fast on CPU)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    tok = default_loaded.tokenizer
    prompts = {f"p{i}": tok.encode(f"{i} plus {i % 7} is") for i in range(30)}
    arrivals = {f"burst-{n}": f"p{n % 30}" for n in range(300)}
    outputs: queue.Queue = queue.Queue()
    decode = DecodeWorker(build_engine(default_loaded, num_blocks=320, max_num_seqs=16),
                          "decode-burst", emit=outputs.put, max_waiting_requests=400)
    sizes = watch_batches(decode.engine)
    colocated = build_engine(default_loaded, num_blocks=96)
    try:
        prefilled = {pid: (kv, token_id)
                     for pid, kv, token_id in prefill_steps(colocated, prompts, params)}
        for rid, pid in arrivals.items():  # all reserved first: one burst
            reply = decode.reserve(reserve_request(rid, prompts[pid], params))
            assert reply.accepted, reply.reason
        for rid, pid in arrivals.items():
            land(decode, rid, *prefilled[pid])
        tokens, ended = collect(outputs, set(arrivals))
        assert max(sizes) == 16  # a full batch, never more: the rest waited in the decode queue
        assert {d.error for d in ended.values()} == {""}
        assert {d.finish_reason for d in ended.values()} <= {"length", "stop"}
        reference = dict(zip(prompts, colocated.generate(list(prompts.values()), params)))
        for rid, pid in arrivals.items():
            assert [prefilled[pid][1]] + tokens[rid] == reference[pid].token_ids, rid
        state = decode.stats().state
        assert state.free_kv_blocks == state.total_kv_blocks
        assert not state.num_running_requests and not state.num_waiting_requests
    finally:
        decode.stop()
    assert decode.engine.kv_manager.is_idle() and not decode.incoming


def test_reservations_beyond_the_queue_limit_are_refused(default_loaded):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    decode = DecodeWorker(build_engine(default_loaded, num_blocks=64, max_num_seqs=2),
                          "decode-limit", emit=lambda outputs: None)
    try:
        assert decode.max_waiting_requests == 8  # 4 x max_num_seqs by default
        for i in range(8):
            assert decode.reserve(reserve_request(f"r{i}", [1, 2, 3], params)).accepted
        reply = decode.reserve(reserve_request("r8", [1, 2, 3], params))
        assert not reply.accepted
        assert reply.reason == "decode queue full: 8 requests waiting (limit 8)"
        for i in range(8):
            assert decode.abort(worker_pb2.AbortTask(request_id=f"r{i}")).found
        assert decode.reserve(reserve_request("r8", [1, 2, 3], params)).accepted
        decode.abort(worker_pb2.AbortTask(request_id="r8"))
        assert decode.stats().state.free_kv_blocks == 64
    finally:
        decode.stop()
    assert decode.engine.kv_manager.is_idle()


def test_queued_requests_count_against_the_limit_and_abort_frees_them(default_loaded):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    outputs: queue.Queue = queue.Queue()
    decode = DecodeWorker(build_engine(default_loaded, num_blocks=64, max_num_seqs=1),
                          "decode-queue", emit=outputs.put, max_waiting_requests=3)
    try:
        for i in range(4):  # one runs, three wait in the decode queue
            assert decode.reserve(reserve_request(f"q{i}", [1, 2, 3], params)).accepted
            land(decode, f"q{i}", None, 5)
        state = decode.stats().state
        assert (state.num_running_requests, state.num_waiting_requests) == (1, 3)
        reply = decode.reserve(reserve_request("q4", [1, 2, 3], params))
        assert reply.reason == "decode queue full: 3 requests waiting (limit 3)"
        for i in range(4):
            assert decode.abort(worker_pb2.AbortTask(request_id=f"q{i}")).found
        state = decode.stats().state
        assert state.free_kv_blocks == 64 and not state.num_waiting_requests
    finally:
        decode.stop()
    assert decode.engine.kv_manager.is_idle()


def test_a_begun_transfer_whose_kv_never_lands_expires(default_loaded):
    # The deadline behind the others: a transfer that began (its descriptor came) but neither
    # landed nor failed fails after LANDING_TIMEOUTS transfer timeouts, even on an idle engine.
    outputs: queue.Queue = queue.Queue()
    decode = DecodeWorker(build_engine(default_loaded, num_blocks=64), "decode-expire",
                          emit=outputs.put, transfer_timeout_s=0.2)
    try:
        prompt = default_loaded.tokenizer.encode("Its KV never comes.")
        assert decode.reserve(reserve_request("late", prompt, SamplingParams(max_tokens=4))).accepted
        decode.loop.call(lambda: decode._mark_begun("late")).result(timeout=10)
        _, ended = collect(outputs, {"late"}, timeout_s=10)
        assert ended["late"].error == "KV transfer failed: no KV within 0.6 s"
        stats = decode.stats().state
        assert stats.free_kv_blocks == stats.total_kv_blocks
    finally:
        decode.stop()
