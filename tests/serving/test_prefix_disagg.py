"""Prefix caching across the prefill -> decode hand-off (issue 17).

Worker level (real workers, a real Gloo pair channel, one process): the decode instance
reserves a request's cached prefix from its own prefix cache and the prefill instance sends only
the blocks after it — the decode KV is byte-identical to a full transfer's and the bytes moved
shrink by exactly the blocks held; a conversation's next turn (whose cached prefix includes the
previous reply, computed by the decode instance) decodes the same tokens as a colocated engine
without prefix caching; salts never share. Cluster level (real Ray 1P+1D over gRPC): outputs
with caching on equal a colocated engine's with caching off (hits ending mid-block, an abort of
one of two requests sharing a prefix), and conditional disaggregation prefills a short
uncached rest on the decode instance without the prefill pool seeing the request. Every
scenario ends with free + cached-free == total in every pool."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from decode_worker.worker import DecodeWorker
from engine.sampling_params import SamplingParams
from kv_transfer.shards import kv_digest
from prefill_worker.worker import DecodePeer, PrefillWorker
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.helpers import build_engine
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = pytest.mark.timeout(600)
BS = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)


def _seed(params: SamplingParams) -> int:
    return 7 if params.seed is None else params.seed  # the reference engine samples with it


class Pair:
    """A prefill and a decode worker joined by a Gloo channel; `decode_caching` sets whether
    the decode instance has a prefix cache (the prefill instance always has one)."""

    def __init__(self, loaded, name: str, decode_caching: bool, decode_blocks: int = 128) -> None:
        self.name = name
        self.outputs: queue.Queue = queue.Queue()
        self.decode = DecodeWorker(build_engine(loaded, num_blocks=decode_blocks,
                                                enable_prefix_caching=decode_caching),
                                   f"decode-{name}", emit=self.outputs.put)
        self.prefill = PrefillWorker(build_engine(loaded, num_blocks=128,
                                                  enable_prefix_caching=True),
                                     f"prefill-{name}", min_message_bytes=0)
        accept = threading.Thread(target=self.decode.accept, args=(f"prefill-{name}", 0, "cpu"))
        accept.start()
        peer = DecodePeer(lambda d: self.decode.expect_transfer(f"prefill-{name}", d),
                          self.decode.first_token)
        self.prefill.connect(f"decode-{name}", self.decode.endpoint(f"prefill-{name}", 0), peer,
                             "cpu")
        accept.join(30)
        self.model = self.decode.engine.model_config.name

    def reserve(self, rid: str, prompt: list[int], params: SamplingParams, salt: str = "",
                **fields) -> worker_pb2.ReserveReply:
        reply = self.decode.reserve(worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=rid, num_prompt_tokens=len(prompt),
            prompt_token_ids=prompt, sampling=sampling_to_proto(params), seed=_seed(params),
            cache_salt=salt, **fields))
        assert reply.accepted, reply.reason
        return reply

    def prefill_only(self, rid: str, prompt: list[int], params: SamplingParams,
                     reply: worker_pb2.ReserveReply, salt: str = "") -> worker_pb2.TokenDelta:
        """The prefill step after `reserve`, as the router asks for it; its first token."""
        results: queue.Queue = queue.Queue()
        self.prefill.submit(worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=rid, prompt_token_ids=prompt,
            sampling=sampling_to_proto(params), seed=_seed(params),
            decode_instance_id=f"decode-{self.name}",
            cache_salt=salt, num_decode_cached_tokens=reply.num_cached_tokens), results.put)
        first = results.get(timeout=60).first_token
        assert not first.error, first.error
        return first

    def prefill_and_stream(self, rid: str, prompt: list[int], params: SamplingParams,
                           reply: worker_pb2.ReserveReply, salt: str = "") -> list[int]:
        """The prefill step after `reserve`, then every token of the request."""
        first = self.prefill_only(rid, prompt, params, reply, salt)
        return list(first.token_ids) + (self.stream(rid) if not first.finish_reason else [])

    def stream(self, rid: str) -> list[int]:
        tokens, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            for delta in self.outputs.get(timeout=60).deltas:
                if delta.request_id == rid:
                    assert not delta.error, delta.error
                    tokens += delta.token_ids
                    if delta.finish_reason:
                        return tokens
        raise AssertionError(f"{rid} did not finish")

    def generate(self, rid: str, prompt: list[int], params: SamplingParams, salt: str = ""):
        reply = self.reserve(rid, prompt, params, salt)
        return reply, self.prefill_and_stream(rid, prompt, params, reply, salt)

    def bytes_received(self) -> float:
        return self.decode.metrics.registry.get_sample_value(
            "pdserve:kv_transfer_bytes_total", {"model_name": self.model}) or 0.0

    def wait_idle(self, timeout_s: float = 20.0) -> None:
        """free + cached-free == total on both instances, nothing in flight."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [w.stats().state for w in (self.prefill, self.decode)]
            if all(s.free_kv_blocks == s.total_kv_blocks and not s.num_inflight_transfers
                   and not s.num_running_requests for s in states):
                return
            time.sleep(0.05)
        raise AssertionError(f"not idle: {states}")

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()


@pytest.fixture(scope="module")
def pairs(default_loaded):
    partial, full = Pair(default_loaded, "p", True), Pair(default_loaded, "f", False)
    yield partial, full
    partial.stop()
    full.stop()


@pytest.fixture(scope="module")
def reference(default_loaded):
    """A colocated engine without prefix caching: what every run must reproduce."""
    engine = build_engine(default_loaded, num_blocks=128, enable_prefix_caching=False)
    return lambda prompt, params: engine.generate([prompt], params)[0].token_ids


def _text_ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer.encode(text)


def test_decode_receives_only_missing_blocks_and_the_kv_is_byte_identical(pairs, default_loaded):
    shared = _text_ids(default_loaded, "Paged KV blocks travel between instances. " * 12)[:5 * BS]
    first = shared + _text_ids(default_loaded, " First question about blocks?")
    second = shared + _text_ids(default_loaded, " A second, different question here, with "
                                "enough words to fill one more block of sixteen tokens.")
    tables, received, replies = {}, {}, {}
    for pair in pairs:
        pair.generate("first", first, GREEDY)  # decoded: the decode side caches its blocks
        pair.wait_idle()
        before = pair.bytes_received()
        replies[pair.name] = reply = pair.reserve("second", second, SamplingParams(max_tokens=1))
        tables[pair.name] = list(pair.decode.engine.block_ids("second"))
        pair.prefill_and_stream("second", second, SamplingParams(max_tokens=1), reply)
        pair.wait_idle()
        received[pair.name] = pair.bytes_received() - before
    num_blocks = len(tables["p"])
    assert replies["p"].num_cached_tokens == 5 * BS and replies["f"].num_cached_tokens == 0
    assert replies["p"].num_blocks == num_blocks - 5 and replies["f"].num_blocks == num_blocks
    assert 0 < received["p"] == received["f"] * (num_blocks - 5) / num_blocks
    # nothing ran since: the freed blocks still hold what landed (or was held)
    digests = {name: kv_digest(pair.decode.engine.kv_cache, tables[name])
               for name, pair in zip("pf", pairs)}
    assert digests["p"] == digests["f"]
    partial = pairs[0]  # landed blocks are named on landing, though it never decoded
    third = partial.reserve("third", second + [5, 6], GREEDY)
    assert third.num_cached_tokens == len(second) // BS * BS > 5 * BS
    partial.decode.abort(worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION,
                                              request_id="third"))
    partial.wait_idle()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_conversations_next_turn_decodes_as_without_caching(pairs, default_loaded, reference,
                                                              params):
    partial, _ = pairs
    turn1 = default_loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a careful assistant. " * 8},
         {"role": "user", "content": "Name a colour."}])
    _, reply1 = partial.generate(f"t1-{params.temperature}", turn1, params)
    assert reply1 == reference(turn1, params)
    turn2 = turn1 + reply1 + _text_ids(default_loaded, " And another one, please?")
    reply, tokens = partial.generate(f"t2-{params.temperature}", turn2, params)
    # its cached prefix reaches into the previous reply, which the decode instance computed
    assert reply.num_cached_tokens == (len(turn1) + len(reply1)) // BS * BS > len(turn1) - BS
    assert tokens == reference(turn2, params)
    salted, tokens = partial.generate(f"t2s-{params.temperature}", turn2, params,
                                       salt=f"other-{params.temperature}")  # a new salt
    assert salted.num_cached_tokens == 0 and tokens == reference(turn2, params)
    partial.wait_idle()


def test_conditional_disaggregation_prefills_on_the_decode_instance(pairs, default_loaded,
                                                                    reference):
    partial, _ = pairs
    prompt = _text_ids(default_loaded, "Conditional disaggregation keeps short rests local. " * 6)
    partial.generate("cd-1", prompt, GREEDY)
    partial.wait_idle()
    queried = partial.prefill.engine.stats()
    follow_up = prompt + _text_ids(default_loaded, " Why?")
    reply = partial.reserve("cd-2", follow_up, GREEDY, prefill_here_below_tokens=BS + 8)
    assert reply.prefill_here and reply.num_cached_tokens >= len(prompt) - BS
    assert partial.stream("cd-2") == reference(follow_up, GREEDY)
    assert partial.prefill.engine.stats() == queried  # the prefill instance saw nothing
    far = _text_ids(default_loaded, "A prompt this instance has never seen at all. " * 3)
    reply = partial.reserve("cd-3", far, GREEDY, prefill_here_below_tokens=BS + 8)
    assert not reply.prefill_here  # nothing cached: the usual hand-off
    assert partial.prefill_and_stream("cd-3", far, GREEDY, reply) == reference(far, GREEDY)
    partial.wait_idle()


def test_preempting_a_request_that_shares_blocks_recomputes_it_alike(default_loaded, reference):
    # 12 blocks: two 9-block sequences sharing 3 cached blocks cannot both finish at once
    pair = Pair(default_loaded, "small", True, decode_blocks=12)
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    shared = _text_ids(default_loaded, "Blocks shared by two sequences on one instance. " * 9)
    prompts = {"a": shared[:3 * BS] + [11, 12, 13, 14, 15, 16, 17, 18],
               "b": shared[:3 * BS] + [21, 22, 23, 24, 25, 26, 27, 28]}
    try:
        tokens = {"a": list(pair.prefill_only("a", prompts["a"], params, pair.reserve(
            "a", prompts["a"], params)).token_ids)}
        tokens["a"] += pair.outputs.get(timeout=60).deltas[0].token_ids  # a's blocks named
        reply = pair.reserve("b", prompts["b"], params)
        assert reply.num_cached_tokens == 3 * BS  # held by a as well
        tokens["b"] = list(pair.prefill_only("b", prompts["b"], params, reply).token_ids)
        ended: set[str] = set()
        while ended != {"a", "b"}:
            for delta in pair.outputs.get(timeout=60).deltas:
                assert not delta.error, delta.error
                tokens[delta.request_id] += delta.token_ids
                if delta.finish_reason:
                    ended.add(delta.request_id)
        assert pair.decode.engine.scheduler.num_preemptions > 0
        for rid, prompt in prompts.items():
            assert tokens[rid] == reference(prompt, params), rid
        pair.wait_idle()
    finally:
        pair.stop()


# ---- the cluster: router, Ray actors, gRPC ----------------------------------------------------

def _scrape(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == name)


@pytest.fixture(scope="module")
def cluster():
    config = replace(cluster_config(1, 1, num_blocks=96),
                     conditional_disagg_max_uncached_tokens=BS)
    with local_ray():
        harness = start_disagg_harness(config)
        yield harness
        harness.close()


async def _together(*calls):
    return await asyncio.gather(*calls)


def _prefill_requests(cluster) -> float:
    target = next(t for t in cluster.cluster.metrics_targets() if t.role == "prefill")
    return _scrape(target.address, "pdserve:request_prefill_time_seconds_count")


def test_cluster_outputs_equal_colocated_without_caching(cluster, default_loaded, reference):
    system = default_loaded.tokenizer.encode("Shared system prompt for every tenant. " * 9)
    prompts = [system[:70] + _text_ids(default_loaded, q) for q in
               (" What is a block?", " Why cache?", " Who decodes?")]  # hits end mid-block

    async def run(prompt, params, salt=None):
        return await cluster.client.generate(prompt_token_ids=prompt, cache_salt=salt,
                                             max_tokens=params.max_tokens,
                                             temperature=params.temperature, top_p=params.top_p,
                                             seed=params.seed, ignore_eos=True)

    for params in (GREEDY, SEEDED):
        first = cluster.run(run(prompts[0], params))
        rest = cluster.run(_together(*(run(p, params) for p in prompts[1:])), timeout_s=120)
        for prompt, got in zip(prompts, [first, *rest]):
            assert got.token_ids == reference(prompt, params)
        assert any(c.usage.cached_tokens >= 4 * BS for c in rest)  # the prefill's hit
    cluster.wait_until_idle()

    async def abort_one_of_two():  # two requests sharing a prefix; one is cancelled mid-way
        keep = asyncio.ensure_future(run(prompts[1] + [17], GREEDY))
        call = cluster.client.generate_stream(prompt_token_ids=prompts[2] + [17], max_tokens=400,
                                              temperature=0.0, ignore_eos=True)
        async for _ in call:
            call.cancel()
            break
        return await keep

    kept = cluster.run(abort_one_of_two(), timeout_s=120)
    assert kept.token_ids == reference(prompts[1] + [17], GREEDY)
    cluster.wait_until_idle()


def test_cluster_conditional_disaggregation_skips_the_prefill_pool(cluster, default_loaded,
                                                                   reference):
    prompt = default_loaded.tokenizer.encode("A conversation that grows turn by turn. " * 6)
    cluster.run(cluster.client.generate(prompt_token_ids=prompt, max_tokens=6, temperature=0.0,
                                        ignore_eos=True))
    cluster.wait_until_idle()
    before = _prefill_requests(cluster)
    follow_up = prompt + _text_ids(default_loaded, " Yes.")
    got = cluster.run(cluster.client.generate(prompt_token_ids=follow_up, max_tokens=6,
                                              temperature=0.0, ignore_eos=True))
    assert got.token_ids == reference(follow_up, GREEDY)
    assert got.usage.cached_tokens >= len(prompt) - BS  # the decode instance's own hit
    assert _prefill_requests(cluster) == before  # the prefill pool saw no request
    cluster.wait_until_idle()
