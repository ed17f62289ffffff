"""The prefill -> decode hand-off between multi-rank instances (real rank processes, real Gloo
groups and pair channels, no Ray): rank i of the prefill instance sends its shard to rank i of
the decode instance. Each decode rank's KV is byte-identical to its prefill rank's; the streams
equal one colocated rank's tokens; both pools are full again; a killed rank fails its instance
at once, every stream of it ends with an error, and the other instance gets its blocks back."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import pytest

from decode_worker.rank_links import DecodeRankService
from decode_worker.worker import DecodeWorker
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.kv_cache.block_table import num_blocks_for
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer.shards import instance_kv_digests
from prefill_worker.rank_links import PrefillRankService
from prefill_worker.worker import DecodePeer, PrefillWorker
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_tokens_or_near_tie

pytestmark = pytest.mark.timeout(300)
BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("handoff-ranks")
    return str(save_tiny_hf_model(root / "llama", "llama", seed=5,
                                  extra_config={"num_hidden_layers": 4}))


def _config(model: str, tp: int, pp: int) -> EngineConfig:
    return EngineConfig(model=model, device="cpu", attention_backend="torch",
                        cache=CacheConfig(block_size=BLOCK, num_blocks=96),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                        parallel=ParallelConfig(tp, pp, collective_timeout_s=20))


@pytest.fixture(scope="module")
def reference(model) -> LLMEngine:
    return LLMEngine(_config(model, 1, 1))


def _pair(model: str, tp: int, pp: int, transfer_timeout_s: float = 10.0):
    prefill = PrefillWorker(LLMEngine(_config(model, tp, pp), rank_service=PrefillRankService),
                            "prefill-r", min_message_bytes=0,
                            transfer_timeout_s=transfer_timeout_s)
    outputs: queue.Queue = queue.Queue()
    decode = DecodeWorker(LLMEngine(_config(model, tp, pp), rank_service=DecodeRankService),
                          "decode-r", emit=outputs.put, transfer_timeout_s=transfer_timeout_s)
    accept = threading.Thread(target=decode.accept, args=("prefill-r", 0, "cpu"))
    accept.start()
    peer = DecodePeer(lambda d: decode.expect_transfer("prefill-r", d), decode.first_token)
    prefill.connect("decode-r", decode.endpoint("prefill-r", 0), peer, "cpu")
    accept.join(60)
    return prefill, decode, outputs


def _submit(prefill, decode, request_id: str, prompt: list[int], params: SamplingParams,
            results: queue.Queue) -> None:
    sampling = sampling_to_proto(params)
    reply = decode.reserve(worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, num_prompt_tokens=len(prompt),
        prompt_token_ids=prompt, sampling=sampling, seed=11))
    assert reply.accepted, reply.reason
    prefill.submit(worker_pb2.PrefillTask(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=prompt,
        sampling=sampling, seed=11, decode_instance_id="decode-r",
        num_decode_cached_tokens=reply.num_cached_tokens), results.put)  # as the router does


def _collect(outputs: queue.Queue, firsts: dict[str, worker_pb2.TokenDelta],
             timeout_s: float = 120.0) -> dict[str, list[worker_pb2.TokenDelta]]:
    streams = {rid: [first] for rid, first in firsts.items()}
    deadline = time.monotonic() + timeout_s
    while any(not (s[-1].finish_reason or s[-1].error) for s in streams.values()):
        assert time.monotonic() < deadline, "streams did not finish"
        for delta in outputs.get(timeout=timeout_s).deltas:
            streams[delta.request_id].append(delta)
    return streams


def _wait_idle(*workers, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [w.stats().state for w in workers]
        if all(s.free_kv_blocks == s.total_kv_blocks and not s.num_inflight_transfers
               for s in states):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {states}")


def _digests(worker, block_ids: list[int]) -> list[str]:
    """Rank 0's digest, then every other rank's (through its rank service)."""
    return instance_kv_digests(worker.engine, block_ids)


def _prompts(vocab_size: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % (vocab_size - 3) + 3 for j in range(5 + 6 * i)] for i in range(6)]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_multi_rank_handoff_is_exact_and_returns_every_block(model, reference, tp, pp):
    prefill, decode, outputs = _pair(model, tp, pp)
    try:
        # 1. KV only (the request ends at the prefill): fresh FIFO pools hold it in blocks 0..n-1
        prompt = _prompts(reference.model_config.vocab_size)[5][:29]
        results: queue.Queue = queue.Queue()
        _submit(prefill, decode, "kv", prompt, SamplingParams(max_tokens=1), results)
        assert results.get(timeout=60).first_token.finish_reason == "length"
        _wait_idle(prefill, decode)
        blocks = list(range(num_blocks_for(len(prompt), BLOCK)))
        sent, landed = _digests(prefill, blocks), _digests(decode, blocks)
        assert len(sent) == tp * pp and len(set(sent)) == tp * pp  # every rank a shard of its own
        assert landed == sent

        # 2. concurrent streams, greedy and seeded: the tokens of one colocated rank
        prompts = _prompts(reference.model_config.vocab_size)
        params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True) if i % 2 else
                  SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=i,
                                 ignore_eos=True) for i in range(len(prompts))]
        for i, (p, sp) in enumerate(zip(prompts, params)):
            _submit(prefill, decode, f"r{i}", p, sp, results)
        firsts = {}
        for _ in prompts:
            result = results.get(timeout=60)
            firsts[result.request_id] = result.first_token
        streams = _collect(outputs, firsts)
        want = reference.generate(prompts, [_seeded(sp, 11) for sp in params])
        for i, (p, sp) in enumerate(zip(prompts, params)):
            got = [t for d in streams[f"r{i}"] for t in d.token_ids]
            assert not streams[f"r{i}"][-1].error
            assert_tokens_or_near_tie(reference, p, sp, got, want[i].token_ids[-8:])
        _wait_idle(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def _seeded(params: SamplingParams, seed: int) -> SamplingParams:
    """The request's sampling as the workers ran it (the task's seed overrides the params')."""
    from dataclasses import replace

    return replace(params, seed=seed)


def test_killed_decode_rank_fails_its_instance_and_the_prefill_gets_its_blocks(model,
                                                                              reference):
    prefill, decode, outputs = _pair(model, 2, 1, transfer_timeout_s=3.0)
    try:
        results: queue.Queue = queue.Queue()
        prompts = _prompts(reference.model_config.vocab_size)
        for i, p in enumerate(prompts):
            _submit(prefill, decode, f"k{i}", p,
                    SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True), results)
        firsts = {}
        for _ in prompts:
            result = results.get(timeout=60)
            firsts[result.request_id] = result.first_token
        os.kill(decode.engine.executor.rank_pids[0], signal.SIGKILL)
        started = time.monotonic()
        streams = _collect(outputs, firsts, timeout_s=30)
        assert time.monotonic() - started < 25  # the collective timeout is 20 s
        assert all(s[-1].error == "decode instance failed" for s in streams.values())
        assert not decode.health().alive
        _wait_idle(prefill)  # the prefill pool is full again, its links are untouched
    finally:
        prefill.stop()
        decode.stop()


def test_killed_prefill_rank_fails_its_prompts_and_the_decode_gets_its_blocks(model, reference):
    prefill, decode, outputs = _pair(model, 2, 1, transfer_timeout_s=3.0)
    try:
        os.kill(prefill.engine.executor.rank_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 25
        while prefill.health().alive:  # the plan socket closes: the engine loop dies at once
            assert time.monotonic() < deadline, "the prefill instance did not notice"
            time.sleep(0.05)
        results: queue.Queue = queue.Queue()
        prompt = _prompts(reference.model_config.vocab_size)[2]
        _submit(prefill, decode, "late", prompt, SamplingParams(max_tokens=4), results)
        assert results.get(timeout=30).first_token.error == "prefill instance failed"
        decode.abort(worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION,
                                          request_id="late"))  # what the router does
        _wait_idle(decode)
        assert decode.health().alive  # the other instance is untouched
    finally:
        prefill.stop()
        decode.stop()
