"""Every prefill TP in {1, 2, 4} x decode TP in {1, 2, 4} (plus PP=2 -> TP=2 and TP=2 -> PP=2)
on tiny random Llama models with 1, 2 and 8 KV heads, at the planner + packing + channel level:
the KV of a real TP=1 prefill is held by the prefill ranks as each layout holds it, moved over
real Gloo pair channels (one per rank pair of the plan, KVSender / KVReceiver, one gather and
one scatter per message) into decode ranks' caches at other block ids, and each decode rank's
cache is then bitwise equal to the corresponding slice of the TP=1 prefill's KV, with every
other block untouched. (The same hand-off through real rank processes and workers, with greedy
outputs compared with a colocated TP=1 engine, runs for a representative subset in
test_reshard_handoff.py: 27 worker pairs of up to 8 processes are too slow on a CI machine.)"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine.config import CacheConfig, EngineConfig
from engine.kv_cache.block_table import num_blocks_for
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer import (ChannelConfig, KVLayoutSpec, KVReceiver, KVSender, PairChannel,
                         PairRole, host_store, join_store, new_descriptor)
from kv_transfer.descriptors import shard_descriptor
from kv_transfer.planner import ModelShape, ParallelLayout, plan_transfer, rank_shard
from kv_transfer.rendezvous import rank_pair_key
from tests.engine.factories import save_tiny_hf_model

pytestmark = pytest.mark.timeout(600)
BLOCK = 4
NUM_LAYERS = 4
PROMPT_LEN = 29  # 8 blocks, the last one partly filled
TP_SIZES = (1, 2, 4)
LAYOUT_PAIRS = [(ParallelLayout(p), ParallelLayout(d)) for p, d in
                itertools.product(TP_SIZES, TP_SIZES)] + [
    (ParallelLayout(1, 2), ParallelLayout(2, 1)), (ParallelLayout(2, 1), ParallelLayout(1, 2))]


@pytest.fixture(scope="module", params=[1, 2, 8], ids=lambda h: f"{h}kv")
def prefilled(request, tmp_path_factory):
    """(model shape, the KV of a TP=1 prefill of one prompt: [layers, blocks, 2, block, heads,
    head_dim] of its blocks, in order)."""
    heads = request.param
    path = save_tiny_hf_model(tmp_path_factory.mktemp(f"reshard-{heads}") / "llama", "llama",
                              seed=heads, extra_config={
                                  "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 8,
                                  "num_key_value_heads": heads})
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", attention_backend="torch",
                                    cache=CacheConfig(block_size=BLOCK, num_blocks=32)))
    prompt = [(7 * j) % 500 + 3 for j in range(PROMPT_LEN)]
    engine.generate([prompt], [SamplingParams(max_tokens=1)])
    blocks = torch.arange(num_blocks_for(PROMPT_LEN, BLOCK))  # a fresh FIFO pool's first ones
    kv = engine.kv_cache[:, blocks].clone()
    assert kv.abs().sum() > 0
    return ModelShape(NUM_LAYERS, heads), kv


def rank_cache(kv: torch.Tensor, layout: ParallelLayout, model: ModelShape, rank: int,
               num_blocks: int, block_ids: torch.Tensor | None) -> torch.Tensor:
    """Rank `rank`'s cache of `num_blocks` blocks: zeros, or with the prompt's KV as that rank
    holds it (its layers, its heads) in `block_ids`."""
    shard = rank_shard(layout, model, rank)
    cache = torch.zeros(shard.num_layers, num_blocks, *kv.shape[2:4], shard.num_heads,
                        kv.shape[5], dtype=kv.dtype)
    if block_ids is not None:
        cache[:, block_ids] = kv[slice(*shard.layers), :, :, :, slice(*shard.heads)]
    return cache


def connect_pairs(plan, specs_p, specs_d, key: str) -> dict[tuple[int, int], tuple]:
    """A real Gloo pair channel per (prefill rank, decode rank) of the plan, both ends built
    concurrently through one store, as the workers do."""
    store = host_store("127.0.0.1", 0)

    def end(role: PairRole, spec, pair: tuple[int, int]) -> PairChannel:
        client = store if role is PairRole.DECODE else join_store("127.0.0.1", store.port)
        config = ChannelConfig(rank_pair_key(key, *pair), role, f"{role.name}-{pair}", "cpu",
                               30.0, "127.0.0.1")
        return PairChannel.connect(client, config, spec)
    pairs = [(m.prefill_rank, m.decode_rank) for m in plan]
    with ThreadPoolExecutor(2 * len(pairs)) as pool:
        sends = {p: pool.submit(end, PairRole.PREFILL, specs_p[p[0]], p) for p in pairs}
        recvs = {p: pool.submit(end, PairRole.DECODE, specs_d[p[1]], p) for p in pairs}
        return {p: (sends[p].result(), recvs[p].result()) for p in pairs}


@pytest.mark.parametrize("prefill,decode", LAYOUT_PAIRS, ids=lambda x: x.name.replace(" ", ""))
def test_each_decode_rank_holds_its_slice_of_the_tp1_prefill(prefilled, prefill, decode):
    model, kv = prefilled
    num_blocks = kv.shape[1]
    src = torch.arange(num_blocks) + 2  # where the prefill ranks hold the prompt
    dst = torch.arange(num_blocks).flip(0) * 2 + 1  # decode blocks, another order
    caches_p = [rank_cache(kv, prefill, model, r, 24, src) for r in range(prefill.world_size)]
    caches_d = [rank_cache(kv, decode, model, r, 24, None) for r in range(decode.world_size)]
    specs_p = [KVLayoutSpec.for_cache(c, "tiny", prefill.name, r, model)
               for r, c in enumerate(caches_p)]
    specs_d = [KVLayoutSpec.for_cache(c, "tiny", decode.name, r, model)
               for r, c in enumerate(caches_d)]
    plan = plan_transfer(prefill, decode, model)
    key = f"p-{prefill.name}->d-{decode.name}@g0".replace(" ", "")
    channels = connect_pairs(plan, specs_p, specs_d, key)
    desc = new_descriptor(key, 0, "req", PROMPT_LEN, num_blocks, (0, NUM_LAYERS), 3)
    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            landed = []
            for m in plan:
                send_ch, recv_ch = channels[(m.prefill_rank, m.decode_rank)]
                shard = shard_descriptor(desc, send_ch.pair_key, m.shard)
                landed.append(pool.submit(KVReceiver(recv_ch).receive, shard.desc,
                                          caches_d[m.decode_rank], dst.tolist(), 30.0,
                                          shard.heads))
            senders = []
            for m in plan:  # each prefill rank streams its shards as its forward pass would
                send_ch, _ = channels[(m.prefill_rank, m.decode_rank)]
                shard = shard_descriptor(desc, send_ch.pair_key, m.shard)
                sender = KVSender(send_ch)
                transfer = sender.begin(shard.desc, caches_p[m.prefill_rank], src.tolist(),
                                        shard.heads)
                for layer in range(caches_p[m.prefill_rank].shape[0]):
                    sender.send_layers(layer, layer + 1)
                senders.append((sender, transfer))
            results = [sender.finish(t, 30.0) for sender, t in senders]
            assert all(f.result().num_bytes > 0 for f in landed)
    finally:
        for send_ch, recv_ch in channels.values():
            send_ch.close()
            recv_ch.close()
    assert sum(r.num_bytes for r in results) == sum(
        kv[slice(*m.shard.layers), :, :, :, slice(*m.shard.heads)].numel() * kv.element_size()
        for m in plan)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[dst] = False
    for rank, cache in enumerate(caches_d):
        shard = rank_shard(decode, model, rank)
        want = kv[slice(*shard.layers), :, :, :, slice(*shard.heads)]
        assert torch.equal(cache[:, dst], want), f"decode rank {rank}"
        assert not cache[:, untouched].any(), f"decode rank {rank} wrote outside its blocks"


def test_a_threaded_send_posts_nothing_before_its_layers_are_written(prefilled):
    """Streaming with PP on the prefill side: a stage's sender only posts a layer group once the
    stage reports its last layer, so the decode side cannot see half-written KV."""
    model, kv = prefilled
    prefill, decode = ParallelLayout(1, 2), ParallelLayout(2, 1)
    num_blocks = kv.shape[1]
    ids = torch.arange(num_blocks)
    caches_p = [rank_cache(kv, prefill, model, r, num_blocks, ids) for r in range(2)]
    caches_d = [rank_cache(kv, decode, model, r, num_blocks, None) for r in range(2)]
    specs_p = [KVLayoutSpec.for_cache(c, "tiny", prefill.name, r, model)
               for r, c in enumerate(caches_p)]
    specs_d = [KVLayoutSpec.for_cache(c, "tiny", decode.name, r, model)
               for r, c in enumerate(caches_d)]
    plan = plan_transfer(prefill, decode, model)
    channels = connect_pairs(plan, specs_p, specs_d, "stream@g0")
    desc = new_descriptor("stream@g0", 0, "req", PROMPT_LEN, num_blocks, (0, NUM_LAYERS), 2)
    message = plan[1]  # prefill stage 1 (layers 2, 3) -> decode rank 0
    send_ch, recv_ch = channels[(message.prefill_rank, message.decode_rank)]
    shard = shard_descriptor(desc, send_ch.pair_key, message.shard)
    sender = KVSender(send_ch)
    transfer = sender.begin(shard.desc, caches_p[1], ids.tolist(), shard.heads)
    sender.send_layers(0, 1)  # stage-local layer 0 = layer 2: its group [2, 4) is not complete
    assert transfer.next_group == 0 and transfer.ready_until == 3
    done = threading.Event()
    receiver = threading.Thread(target=lambda: (KVReceiver(recv_ch).receive(
        shard.desc, caches_d[0], ids.tolist(), 30.0, shard.heads), done.set()))
    receiver.start()
    assert not done.wait(0.5)
    sender.send_layers(1, 2)
    sender.finish(transfer, 30.0)
    receiver.join(30)
    assert done.is_set()
    assert torch.equal(caches_d[0][2:4], kv[2:4, :, :, :, slice(*message.shard.heads)])
    for send_ch, recv_ch in channels.values():
        send_ch.close()
        recv_ch.close()
