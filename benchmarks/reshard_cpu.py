"""What re-sharding the KV costs on CPU: a 2k-token prompt's KV moved prefill -> decode over
Gloo pair channels (KVSender / KVReceiver, the workers' code path), for
    same   P TP=1 -> D TP=1: one channel, every head (the baseline: the same bytes, no re-shard)
    shard  P TP=1 -> D TP=2: two channels from one prefill rank, each a strided gather of half
           the heads (kv_transfer/planner.py: what a TP=1 prefill feeding a TP=2 decode does)
    pairs  P TP=2 -> D TP=2: two channels from two prefill ranks, each its own (contiguous) heads
The prefill side runs in one process (a thread per channel), the decode side in another. Messages
are sized as the workers size them (min_message_bytes 32 MiB). Per layout: the median over REPS
transfers of the time from the first begin() to the last acknowledgement, and the pack (gather)
time alone. Run: python benchmarks/reshard_cpu.py -> table, benchmarks/results/reshard_cpu.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py would shadow a package

from kv_transfer import (ChannelConfig, KVLayoutSpec, KVReceiver, KVSender,  # noqa: E402
                         PairChannel, PairRole, host_store, join_store, new_descriptor)
from kv_transfer.descriptors import (DEFAULT_MIN_MESSAGE_BYTES,  # noqa: E402
                                     layers_per_message_for, shard_descriptor)
from kv_transfer.packing import pack_blocks  # noqa: E402
from kv_transfer.planner import (ModelShape, ParallelLayout, plan_transfer,  # noqa: E402
                                 rank_shard)
from kv_transfer.rendezvous import rank_pair_key  # noqa: E402

MODEL = ModelShape(num_layers=16, num_kv_heads=8)  # a 1B-class GQA model's KV
HEAD_DIM, BLOCK, TOKENS, DTYPE = 64, 16, 2048, torch.bfloat16
NUM_BLOCKS = TOKENS // BLOCK
REPS, WARMUP = 10, 2
LAYOUTS = {"same": (1, 1), "shard": (1, 2), "pairs": (2, 2)}


def cache(layout: ParallelLayout, rank: int, fill: bool) -> torch.Tensor:
    shard = rank_shard(layout, MODEL, rank)
    shape = (shard.num_layers, NUM_BLOCKS + 8, 2, BLOCK, shard.num_heads, HEAD_DIM)
    return torch.randn(shape).to(DTYPE) if fill else torch.zeros(shape, dtype=DTYPE)


def channels(role: PairRole, layout: ParallelLayout, plan, port: int, key: str, store=None):
    """This side's channel end per message of the plan (built concurrently), and its caches."""
    rank_of = (lambda m: m.prefill_rank) if role is PairRole.PREFILL else (lambda m: m.decode_rank)
    caches = {r: cache(layout, r, role is PairRole.PREFILL) for r in range(layout.world_size)}

    def end(message) -> PairChannel:
        client = store if store is not None else join_store("127.0.0.1", port)
        spec = KVLayoutSpec.for_cache(caches[rank_of(message)], "bench", layout.name,
                                      rank_of(message), MODEL)
        pair_key = rank_pair_key(key, message.prefill_rank, message.decode_rank)
        return PairChannel.connect(client, ChannelConfig(pair_key, role, role.name, "cpu", 60.0,
                                                         "127.0.0.1"), spec)
    with ThreadPoolExecutor(len(plan)) as pool:
        return list(pool.map(end, plan)), caches, rank_of


def descriptor(key: str, seq: int, plan) -> object:
    layer_bytes = NUM_BLOCKS * 2 * BLOCK * HEAD_DIM * DTYPE.itemsize * min(
        m.shard.num_heads for m in plan)
    per_message = layers_per_message_for(MODEL.num_layers, layer_bytes, 1,
                                         DEFAULT_MIN_MESSAGE_BYTES)
    return new_descriptor(key, seq, f"r{seq}", TOKENS, NUM_BLOCKS, (0, MODEL.num_layers),
                          per_message)


def decode_side(p_tp: int, d_tp: int, port_queue, key: str) -> None:
    store = host_store("127.0.0.1", 0)
    port_queue.put(store.port)
    prefill, decode = ParallelLayout(p_tp), ParallelLayout(d_tp)
    plan = plan_transfer(prefill, decode, MODEL)
    ends, caches, rank_of = channels(PairRole.DECODE, decode, plan, store.port, key, store)
    receivers = [KVReceiver(ch) for ch in ends]
    ids = list(range(NUM_BLOCKS + 7, 7, -1))  # other block ids, another order
    with ThreadPoolExecutor(len(plan)) as pool:
        for seq in range(WARMUP + REPS):
            desc = descriptor(key, seq, plan)
            futures = [pool.submit(receivers[i].receive, shard.desc, caches[rank_of(m)], ids,
                                   60.0, shard.heads)
                       for i, m in enumerate(plan)
                       for shard in [shard_descriptor(desc, ends[i].pair_key, m.shard)]]
            for future in futures:
                future.result()
    for ch in ends:
        ch.close()


def prefill_side(p_tp: int, d_tp: int, port: int, key: str) -> dict:
    prefill, decode = ParallelLayout(p_tp), ParallelLayout(d_tp)
    plan = plan_transfer(prefill, decode, MODEL)
    ends, caches, rank_of = channels(PairRole.PREFILL, prefill, plan, port, key)
    senders = [KVSender(ch) for ch in ends]
    ids = list(range(NUM_BLOCKS))

    def send(i: int, desc) -> int:
        m = plan[i]
        shard = shard_descriptor(desc, ends[i].pair_key, m.shard)
        transfer = senders[i].begin(shard.desc, caches[rank_of(m)], ids, shard.heads)
        senders[i].send_layers(0, caches[rank_of(m)].shape[0])  # the forward pass wrote all
        return senders[i].finish(transfer, 60.0).num_bytes

    times, num_bytes = [], 0
    with ThreadPoolExecutor(len(plan)) as pool:
        for seq in range(WARMUP + REPS):
            desc = descriptor(key, seq, plan)
            started = time.perf_counter()
            num_bytes = sum(pool.map(lambda i: send(i, desc), range(len(plan))))
            if seq >= WARMUP:
                times.append(time.perf_counter() - started)
    for ch in ends:
        ch.close()
    return {"transfer_ms": 1e3 * statistics.median(times), "transfer_ms_all": [
        round(1e3 * t, 2) for t in times], "bytes": num_bytes, "channels": len(plan),
        "layers_per_message": descriptor(key, 0, plan).layers_per_message,
        "pack_ms": pack_ms(prefill, plan, caches)}


def pack_ms(prefill: ParallelLayout, plan, caches) -> float:
    """The gathers alone (one per message), median over REPS: what slicing heads costs."""
    ids = torch.arange(NUM_BLOCKS)
    times = []
    for _ in range(REPS):
        started = time.perf_counter()
        for m in plan:
            held = rank_shard(prefill, MODEL, m.prefill_rank)
            heads = slice(m.shard.heads[0] - held.heads[0], m.shard.heads[1] - held.heads[0])
            pack_blocks(caches[m.prefill_rank], ids, slice(0, MODEL.num_layers), heads=heads)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def run(name: str, p_tp: int, d_tp: int) -> dict:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    key = f"bench-{name}@g0"
    decode = ctx.Process(target=decode_side, args=(p_tp, d_tp, ports, key))
    decode.start()
    try:
        result = prefill_side(p_tp, d_tp, ports.get(timeout=60), key)
    finally:
        decode.join(120)
        if decode.is_alive():
            decode.kill()
    return {"layout": f"P TP={p_tp} -> D TP={d_tp}", **result}


def main() -> None:
    torch.set_num_threads(1)
    results = {name: run(name, *tps) for name, tps in LAYOUTS.items()}
    base = results["same"]["transfer_ms"]
    print(f"{TOKENS}-token prompt, {MODEL.num_layers} layers x {MODEL.num_kv_heads} KV heads x "
          f"{HEAD_DIM} ({DTYPE}), {results['same']['bytes'] / 2**20:.0f} MiB of KV, Gloo, CPU")
    print(f"{'case':6} {'layout':18} {'channels':>8} {'msg layers':>10} {'transfer ms':>12} "
          f"{'vs same':>8} {'pack ms':>8}")
    for name, r in results.items():
        r["vs_same"] = r["transfer_ms"] / base
        print(f"{name:6} {r['layout']:18} {r['channels']:>8} {r['layers_per_message']:>10} "
              f"{r['transfer_ms']:>12.1f} {r['vs_same']:>7.2f}x {r['pack_ms']:>8.1f}")
    out = Path(__file__).parent / "results" / "reshard_cpu.json"
    out.write_text(json.dumps({"tokens": TOKENS, "layers": MODEL.num_layers,
                               "kv_heads": MODEL.num_kv_heads, "head_dim": HEAD_DIM,
                               "dtype": str(DTYPE), "reps": REPS, "results": results},
                              indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
