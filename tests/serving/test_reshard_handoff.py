"""The prefill -> decode hand-off between instances of different parallel layouts, with real rank
processes, real Gloo groups and pair channels (no Ray): the KV is re-sharded on the way (the
transfer plan of kv_transfer/planner.py). For a representative set of layouts (the full TP
matrix runs at the channel level in test_reshard_matrix.py): every decode rank's KV is bitwise
the corresponding slice of the prefill instance's KV (for a TP=1 prefill: of a TP=1 prefill,
exactly), greedy streams give the tokens of one colocated rank, and both pools are full again.
Then failures of a multi-shard transfer (TP=1 -> TP=2, two shards): one shard refused, every
shard stalled past the deadline, and requests cancelled mid-transfer: no hang, every block of
both instances back in its pool, and a rebuilt pair works again."""

from __future__ import annotations

import queue
import threading
import time
import pytest
import torch

from decode_worker.rank_links import DecodeRankService
from decode_worker.worker import DecodeWorker
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.kv_cache.block_table import num_blocks_for
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer import FaultInjection
from kv_transfer.planner import ModelShape, ParallelLayout, rank_shard
from kv_transfer.shards import instance_kv_blocks
from prefill_worker.rank_links import PrefillRankService
from prefill_worker.worker import DecodePeer, PrefillWorker
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_tokens_or_near_tie

pytestmark = pytest.mark.timeout(400)
BLOCK = 4
NUM_LAYERS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, str]:
    """Tiny Llamas by KV head count (8 query heads, 4 layers)."""
    root = tmp_path_factory.mktemp("reshard-handoff")
    return {heads: str(save_tiny_hf_model(root / f"llama{heads}", "llama", seed=heads,
                                          extra_config={"num_hidden_layers": NUM_LAYERS,
                                                        "num_attention_heads": 8,
                                                        "num_key_value_heads": heads}))
            for heads in (1, 2)}


def _config(model: str, layout: ParallelLayout) -> EngineConfig:
    # prefix caching off: these tests reuse prompts, and the hand-off of cached prefixes is
    # tested on its own (tests/serving/test_prefix_disagg.py)
    return EngineConfig(model=model, device="cpu", attention_backend="torch",
                        cache=CacheConfig(block_size=BLOCK, num_blocks=192,
                                          enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                        parallel=ParallelConfig(layout.tp, layout.pp, collective_timeout_s=60))


def _engine(model: str, layout: ParallelLayout, service) -> LLMEngine:
    return LLMEngine(_config(model, layout), rank_service=service if layout.world_size > 1
                     else None)


class Pair:
    """A prefill and a decode worker of the given layouts, paired (and re-paired) as the router
    pairs them."""

    def __init__(self, model: str, prefill: ParallelLayout, decode: ParallelLayout,
                 transfer_timeout_s: float = 10.0) -> None:
        self.prefill = PrefillWorker(_engine(model, prefill, PrefillRankService), "prefill-x",
                                     min_message_bytes=0, transfer_timeout_s=transfer_timeout_s)
        self.outputs: queue.Queue = queue.Queue()
        self.decode = DecodeWorker(_engine(model, decode, DecodeRankService), "decode-x",
                                   emit=self.outputs.put, transfer_timeout_s=transfer_timeout_s)
        self.generation = -1
        self.connect()

    def connect(self) -> None:
        self.generation += 1
        accept = threading.Thread(target=self.decode.accept,
                                  args=("prefill-x", self.generation, "cpu"))
        accept.start()
        peer = DecodePeer(lambda d: self.decode.expect_transfer("prefill-x", d),
                          self.decode.first_token)
        self.prefill.connect("decode-x", self.decode.endpoint("prefill-x", self.generation),
                             peer, "cpu")
        accept.join(60)
        assert not accept.is_alive()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               results: queue.Queue) -> None:
        sampling = sampling_to_proto(params)
        reply = self.decode.reserve(worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=request_id,
            num_prompt_tokens=len(prompt), prompt_token_ids=prompt, sampling=sampling, seed=11))
        assert reply.accepted, reply.reason
        self.prefill.submit(worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=prompt,
            sampling=sampling, seed=11, decode_instance_id="decode-x",
            num_decode_cached_tokens=reply.num_cached_tokens), results.put)  # as the router

    def collect(self, firsts: dict[str, worker_pb2.TokenDelta], timeout_s: float = 60.0):
        streams = {rid: [first] for rid, first in firsts.items()}
        deadline = time.monotonic() + timeout_s
        while any(not (s[-1].finish_reason or s[-1].error) for s in streams.values()):
            assert time.monotonic() < deadline, "streams did not finish"
            for delta in self.outputs.get(timeout=timeout_s).deltas:
                stream = streams.get(delta.request_id)
                if stream is not None and not (stream[-1].finish_reason or stream[-1].error):
                    stream.append(delta)  # else a stream that ended already: the router drops it
        return streams

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [w.stats().state for w in (self.prefill, self.decode)]
            if all(s.free_kv_blocks == s.total_kv_blocks and not s.num_inflight_transfers
                   for s in states):
                return
            time.sleep(0.05)
        raise AssertionError(f"not idle: {states}")

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 400 + 3 for j in range(5 + 6 * i)] for i in range(n)]


def _assemble(blocks_per_rank: list[torch.Tensor], layout: ParallelLayout,
              model: ModelShape) -> torch.Tensor:
    """An instance's KV of some blocks in model coordinates, from each rank's shard (replicas
    must agree)."""
    first = blocks_per_rank[0]
    whole = torch.full((model.num_layers, *first.shape[1:4], model.num_kv_heads,
                        first.shape[5]), float("nan"), dtype=first.dtype)
    for rank, blocks in enumerate(blocks_per_rank):
        shard = rank_shard(layout, model, rank)
        part = whole[slice(*shard.layers), :, :, :, slice(*shard.heads)]
        if not part.isnan().any():
            assert torch.equal(part, blocks), f"replica rank {rank} disagrees"
        part.copy_(blocks)
    assert not whole.isnan().any()
    return whole


# Slow (make test-slow): TP=1 -> TP=2 runs through the whole stack in test_reshard_cluster.py,
# and the read from one of 4 prefill replicas at the channel level in test_reshard_matrix.py.
SLOW = pytest.mark.slow
CASES = [  # (KV heads, prefill layout, decode layout[, marks])
    (2, ParallelLayout(1), ParallelLayout(2), SLOW),
    (2, ParallelLayout(2), ParallelLayout(1)),
    (1, ParallelLayout(1), ParallelLayout(4)),  # decode replicates the head on 4 ranks
    (1, ParallelLayout(4), ParallelLayout(1), SLOW),  # read from one of 4 prefill replicas
    (2, ParallelLayout(1, 2), ParallelLayout(2)),
    (2, ParallelLayout(2), ParallelLayout(1, 2)),
]


@pytest.mark.parametrize("heads,prefill,decode", [
    pytest.param(h, p, d, marks=marks, id=f"{h}kv-p{p.tp}x{p.pp}-d{d.tp}x{d.pp}")
    for h, p, d, *marks in CASES])
def test_resharded_handoff_is_exact_and_streams_equal_one_rank(models, heads, prefill, decode):
    model = ModelShape(NUM_LAYERS, heads)
    reference = LLMEngine(_config(models[heads], ParallelLayout()))
    pair = Pair(models[heads], prefill, decode)
    try:
        # 1. KV only (the request ends at the prefill): fresh FIFO pools hold it in 0..n-1
        prompt = _prompts(6)[5][:29]
        results: queue.Queue = queue.Queue()
        pair.submit("kv", prompt, SamplingParams(max_tokens=1), results)
        assert results.get(timeout=60).first_token.finish_reason == "length"
        pair.wait_idle()
        blocks = list(range(num_blocks_for(len(prompt), BLOCK)))
        sent = _assemble(instance_kv_blocks(pair.prefill.engine, blocks), prefill, model)
        landed = instance_kv_blocks(pair.decode.engine, blocks)
        for rank, got in enumerate(landed):
            shard = rank_shard(decode, model, rank)
            assert torch.equal(got, sent[slice(*shard.layers), :, :, :, slice(*shard.heads)])
        if prefill.world_size == 1:  # the TP=1 prefill's own KV, exactly
            reference.generate([prompt], [SamplingParams(max_tokens=1)])
            assert torch.equal(sent, reference.kv_cache[:, blocks])

        # 2. concurrent greedy streams: the tokens of one colocated rank
        prompts = _prompts(4)
        for i, p in enumerate(prompts):
            pair.submit(f"r{i}", p, GREEDY, results)
        firsts = {}
        for _ in prompts:
            result = results.get(timeout=60)
            firsts[result.request_id] = result.first_token
        streams = pair.collect(firsts)
        want = reference.generate(prompts, [GREEDY] * len(prompts))
        for i, p in enumerate(prompts):
            assert not streams[f"r{i}"][-1].error, streams[f"r{i}"][-1].error
            got = [t for d in streams[f"r{i}"] for t in d.token_ids]
            assert_tokens_or_near_tie(reference, p, GREEDY, got, want[i].token_ids[-6:])
        pair.wait_idle()
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def one_to_two(models):
    """Prefill TP=1 -> decode TP=2: every transfer is two shards on two pair channels."""
    pair = Pair(models[2], ParallelLayout(1), ParallelLayout(2), transfer_timeout_s=3.0)
    yield pair
    pair.stop()


def _first_tokens(pair: Pair, prompts: list[list[int]], prefix: str,
                  params: SamplingParams = GREEDY) -> dict[str, worker_pb2.TokenDelta]:
    """Each request's first token, as the router sees it: a prompt whose transfer could not
    begin (its channel already broken) ends here, and its reservation is aborted."""
    results: queue.Queue = queue.Queue()
    for i, p in enumerate(prompts):
        pair.submit(f"{prefix}{i}", p, params, results)
    firsts = {}
    for _ in prompts:
        result = results.get(timeout=60)
        firsts[result.request_id] = result.first_token
        if result.transfer.status != worker_pb2.TRANSFER_STATUS_OK:
            pair.decode.abort(worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION,
                                                   request_id=result.request_id))
            firsts[result.request_id].error = f"KV transfer failed: {result.transfer.message}"
    return firsts


def _recovers(pair: Pair) -> None:
    """After a failure the router rebuilds the pair under the next generation: it works."""
    pair.connect()
    streams = pair.collect(_first_tokens(pair, _prompts(2), f"ok{pair.generation}-"))
    assert all(not s[-1].error and s[-1].finish_reason == "length" for s in streams.values())
    pair.wait_idle()


def test_one_refused_shard_fails_the_transfer_and_every_block_returns(one_to_two):
    pair = one_to_two
    shard_links = pair.prefill.links["decode-x"].links
    assert sorted(shard_links) == [0, 1]
    shard_links[1].sender._faults = FaultInjection(corrupt_header=True)  # decode rank 1 refuses
    streams = pair.collect(_first_tokens(pair, _prompts(3)[1:], "bad"), timeout_s=60)
    assert all(s[-1].error.startswith("KV transfer failed") for s in streams.values())
    pair.wait_idle()
    _recovers(pair)


def test_stalled_shards_time_out_without_a_hang(one_to_two):
    pair = one_to_two
    pair.prefill.set_faults(FaultInjection(drop_after_layers=2))  # both shards go silent
    started = time.monotonic()
    streams = pair.collect(_first_tokens(pair, _prompts(3)[1:], "stall"), timeout_s=60)
    assert all(s[-1].error.startswith("KV transfer failed") for s in streams.values())
    assert time.monotonic() - started < 30  # transfer timeout 3 s: no hang
    pair.wait_idle()
    _recovers(pair)


def test_requests_cancelled_mid_transfer_return_every_block(one_to_two):
    pair = one_to_two
    pair.prefill.set_faults(FaultInjection(delay_s=0.1))  # each message waits: cancel lands
    long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    firsts = _first_tokens(pair, _prompts(3), "cancel", long)
    for request_id in firsts:  # what the router does when the client goes away
        pair.prefill.abort(request_id)  # its blocks go when its shards are acknowledged
        reply = pair.decode.abort(worker_pb2.AbortTask(
            protocol_version=PROTOCOL_VERSION, request_id=request_id, transfer_begun=True))
        assert reply.found  # reserved (its shards landing), or running: never finished
    pair.wait_idle()
    pair.prefill.set_faults(FaultInjection())
    _recovers(pair)
