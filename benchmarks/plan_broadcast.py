"""What handing each step's plan to the other ranks costs, and what tensor parallelism costs on CPU.

1. Plan size (pickled bytes) of a decode step at batch 1 and 64 (1k-token contexts).
2. Per plan, with 2 peer processes (an instance of 3 ranks): the time rank 0 spends sending it
   over the authenticated sockets we use (engine/executor/plan_channel.py), the time until both
   peers have it (round trip with a 1-byte ack, halved), and the same plan as a Gloo broadcast
   (length, then payload) over a 3-rank group, the alternative.
3. The default model, 16 greedy requests x 64 tokens: tokens/s at TP=1 and TP=3 (CPU ranks).
Run: python benchmarks/plan_broadcast.py  -> table, benchmarks/results/plan_broadcast_cpu.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import secrets
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch._C._distributed_c10d import BroadcastOptions, PrefixStore, ProcessGroupGloo, TCPStore

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py would shadow a package

from engine.executor.plan_channel import PlanReceiver, PlanSender  # noqa: E402
from engine.plan import PlanBuilder  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402

PEERS = 2
REPS = 300


def decode_plan(batch: int, context: int = 1024):
    planner, reqs = PlanBuilder(), []
    for i in range(batch):
        r = Request(f"{secrets.token_hex(16)}", list(range(context)),
                    SamplingParams(max_tokens=1 << 20, temperature=0.0), 0, 1 << 20)
        r.output_token_ids.append(5)
        reqs.append((r, list(range(i * 70, i * 70 + 70))))
    planner.build(SchedulerOutput([ScheduledChunk(r, r.num_tokens - 1, 1, t, True)
                                   for r, t in reqs]))  # first plan: whole tables
    for r, _ in reqs:
        r.output_token_ids.append(6)
    return planner.build(SchedulerOutput([ScheduledChunk(r, r.num_tokens - 1, 1, t, True)
                                          for r, t in reqs]))  # steady state: no table change


def _socket_peer(address, authkey, ack_address, rank: int) -> None:
    from multiprocessing.connection import Client
    receiver = PlanReceiver(address, authkey, 30, rank)
    ack = Client(ack_address, authkey=authkey)
    while receiver.recv() is not None:
        ack.send_bytes(b"k")


def bench_socket(plan) -> dict:
    from multiprocessing.connection import Listener
    authkey = secrets.token_bytes(32)
    sender = PlanSender("127.0.0.1", authkey)
    acks = Listener(("127.0.0.1", 0), authkey=authkey)
    procs = [mp.Process(target=_socket_peer, args=(sender.address, authkey, acks.address, i + 1))
             for i in range(PEERS)]
    for p in procs:
        p.start()
    sender.accept(PEERS, 30)
    ack_conns = [acks.accept() for _ in range(PEERS)]
    send_s = round_s = 0.0
    for i in range(REPS + 20):
        t0 = time.perf_counter()
        sender.send(plan)
        t1 = time.perf_counter()
        for c in ack_conns:
            c.recv_bytes()
        t2 = time.perf_counter()
        if i >= 20:
            send_s, round_s = send_s + t1 - t0, round_s + t2 - t0
    sender.close()
    for p in procs:
        p.join(10)
    return {"send_us": send_s / REPS * 1e6, "delivered_us": round_s / REPS * 1e6 / 2}


def _gloo_rank(rank: int, port: int, size: int, out) -> None:
    store = TCPStore("127.0.0.1", port, PEERS + 1, False, timedelta(seconds=30))
    group = _gloo(store, rank)
    times = []
    for i in range(REPS + 20):
        t0 = time.perf_counter()
        length = torch.zeros(1, dtype=torch.int64)
        _bcast(group, length)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        _bcast(group, payload)
        pickle.loads(payload.numpy().tobytes())
        times.append(time.perf_counter() - t0)
    out.put(sum(times[20:]) / REPS)


def _gloo(store, rank: int) -> ProcessGroupGloo:
    options = ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=30)
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return ProcessGroupGloo(PrefixStore("plan", store), rank, PEERS + 1, options)


def _bcast(group, tensor) -> None:
    options = BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([tensor], options).wait(timedelta(seconds=30))


def bench_gloo(plan) -> dict:
    store = TCPStore("127.0.0.1", 0, PEERS + 1, True, timedelta(seconds=30),
                     wait_for_workers=False)
    out = mp.Queue()
    procs = [mp.Process(target=_gloo_rank, args=(r, store.port, len(pickle.dumps(plan)), out))
             for r in range(1, PEERS + 1)]
    for p in procs:
        p.start()
    group = _gloo(store, 0)
    total = 0.0
    for i in range(REPS + 20):
        t0 = time.perf_counter()
        payload = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
        _bcast(group, torch.tensor([payload.numel()], dtype=torch.int64))
        _bcast(group, payload)
        if i >= 20:
            total += time.perf_counter() - t0
    peers = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    return {"root_us": total / REPS * 1e6, "peer_us": max(peers) * 1e6}


def bench_tp(tp: int) -> dict:
    from engine.config import CacheConfig, EngineConfig, ParallelConfig
    from engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(device="cpu", cache=CacheConfig(num_blocks=512),
                                    parallel=ParallelConfig(tp)))
    prompts = [[1 + (7 * i + j) % 4000 for j in range(32)] for i in range(16)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    started = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - started
    row = {"tp": tp, "tokens_per_s": sum(len(o.token_ids) - 32 for o in outs) / elapsed}
    stats = getattr(engine.executor, "plan_stats", None)
    if stats is not None and stats.num_plans:
        row["plan_send_us"] = stats.send_s / stats.num_plans * 1e6
        row["plan_bytes"] = stats.num_bytes / stats.num_plans
    engine.shutdown()
    return row


def main() -> None:
    rows = []
    for batch in (1, 64):
        plan = decode_plan(batch)
        row = {"batch": batch, "plan_bytes": len(pickle.dumps(plan, pickle.HIGHEST_PROTOCOL))}
        row.update({f"socket_{k}": v for k, v in bench_socket(plan).items()})
        row.update({f"gloo_{k}": v for k, v in bench_gloo(plan).items()})
        rows.append(row)
        print(row)
    tp_rows = [bench_tp(1), bench_tp(3)]
    for row in tp_rows:
        print(row)
    result = {"device": "cpu", "cores": torch.get_num_threads(), "peers": PEERS,
              "plans": rows, "tensor_parallel": tp_rows}
    path = Path(__file__).parent / "results" / "plan_broadcast_cpu.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
