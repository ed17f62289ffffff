"""KV hand-off between pools of different parallel layouts, through the serving cluster.

Each layout is a real disaggregated cluster (benchmarks/multigpu_cluster.py: Ray actors, the
router, NCCL between GPU ranks; Gloo on CPU), started in turn on the same random-weight folder:
  handoff_tp2: 1P (TP=2) + 1D (TP=2): each prefill rank sends its own KV heads to one decode rank
  hetero:      2P (TP=1) + 1D (TP=2), and 1P (TP=2) + 2D (TP=1): the KV re-sharded on the way
               (kv_transfer/planner.py)
  each next to 1P (TP=1) + 1D (TP=1), the same bytes without a re-shard.
Per layout: greedy outputs equal to one colocated TP=1 engine on the same weights (after the
clusters, on GPU 0); for `--tokens`-token prompts (medians) the router's timing of the hand-off
(`kv_transfer_s`: the decode side's receive window, which overlaps the prefill since layers are
sent as they are computed) and the part of it past the prefill, the client's TTFT and time to
token 2 against the colocated engine's prefill of the same prompt; and, after the clusters, raw
NCCL (Gloo on CPU) send/recv of one rank pair's share of the bytes between two GPUs, the wire's
floor. (The hand-off of already computed KV per rank pair against raw NCCL, without a prefill
around it, is benchmarks/reshard_cpu.py's measurement, CPU-only for now.)

  issue 21 part 1: python benchmarks/layout_handoff.py --layouts handoff_tp2
  issue 21 part 2: python benchmarks/layout_handoff.py --layouts hetero
  dry run:         ... --device cpu --tiny
Needs Ray and grpcio >= 1.85 (carry .whl/, see benchmarks/multigpu4_suite.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py

import torch  # noqa: E402

from benchmarks.multigpu_cluster import (ClusterLayout, PoolLayout, cluster_config,  # noqa: E402
                                         running_cluster, start_ray, stream_greedy, warm_up)
from benchmarks.multigpu_common import (RunMode, add_mode_args, first_difference,  # noqa: E402
                                        gpu_facts, mode_from_args, model_folder,
                                        require_cluster_packages, write_json)

SAME = ClusterLayout("1P-tp1_1D-tp1", PoolLayout(1, 1), PoolLayout(1, 1))
LAYOUT_SETS = {
    "handoff_tp2": [ClusterLayout("1P-tp2_1D-tp2", PoolLayout(1, 2), PoolLayout(1, 2)), SAME],
    "hetero": [ClusterLayout("2P-tp1_1D-tp2", PoolLayout(2, 1), PoolLayout(1, 2)),
               ClusterLayout("1P-tp2_2D-tp1", PoolLayout(1, 2), PoolLayout(2, 1)), SAME],
}


def prompts_of(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (n,), generator=gen).tolist() for n in lengths]


async def run_layout(folder: Path, mode: RunMode, layout: ClusterLayout, checks: list[list[int]],
                     timed: list[list[int]], max_tokens: int, num_blocks: int | None) -> dict:
    config = cluster_config(folder, mode, layout, max(map(len, timed)), num_blocks)
    started = time.perf_counter()
    async with running_cluster(config) as (_, client):
        start_s = time.perf_counter() - started
        info = await client.model_info()
        await warm_up(client, info.vocab_size)
        outputs = [(await stream_greedy(client, p, max_tokens)).token_ids for p in checks]
        runs = [await stream_greedy(client, p, 2) for p in timed]
    row = {"layout": layout.name, "prefill": str(layout.prefill), "decode": str(layout.decode),
           "gpus": layout.num_gpus, "start_s": start_s, "tokens": outputs,
           "prompt_tokens": len(timed[0]),
           # the decode side's receive, from expecting the KV to its last layer landing: it
           # overlaps the prefill (layer-wise sends); what sticks out past the prefill is exposed
           "transfer_window_s": statistics.median(r.kv_transfer_s for r in runs),
           "router_prefill_s": statistics.median(r.prefill_s for r in runs),
           "exposed_transfer_s": statistics.median(max(0.0, r.kv_transfer_s - r.prefill_s)
                                                   for r in runs),
           "ttft_s": statistics.median(r.ttft_s for r in runs),
           "token2_s": statistics.median(r.e2e_s for r in runs)}
    print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
    return row


def colocated_reference(folder: Path, mode: RunMode, timed: list[list[int]]):
    """One TP=1 engine: the outputs to equal, and its prefill / token-2 time per prompt."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(
        model=str(folder), device=mode.device, dtype=mode.dtype,
        attention_backend="torch" if mode.device == "cpu" else "auto",
        cache=CacheConfig(block_size=16, num_blocks=2048, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(2048, max(map(len, timed))))))
    times = {1: [], 2: []}
    for prompt in [timed[0]] + timed:  # the first one compiles
        for n in (1, 2):
            mode.sync()
            started = time.perf_counter()
            engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0,
                                                     ignore_eos=True))
            times[n].append(time.perf_counter() - started)
    return engine, statistics.median(times[1][1:]), statistics.median(times[2][1:])


def kv_bytes(folder: Path, num_tokens: int, mode: RunMode) -> int:
    from engine.loader.source import open_model

    cfg = open_model(str(folder)).config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (4 if mode.device == "cpu" else 2)
    return per_token * num_tokens


def raw_send_recv_s(num_bytes: int, mode: RunMode, reps: int = 5) -> float:
    """Median seconds of one send + a small ack between two ranks (GPU 0 -> GPU 1 over NCCL,
    or two CPU processes over Gloo), the same round trip a hand-off's acknowledgement makes."""
    import torch.multiprocessing as mp

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_raw_rank, args=(r, store.port, mode.device, num_bytes, reps, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(60)


def _raw_rank(rank: int, port: int, device: str, num_bytes: int, reps: int, queue) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    buf = torch.ones(num_bytes, dtype=torch.uint8, device=dev)
    ack = torch.zeros(4, dtype=torch.int64, device=dev)
    times = []
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(ack, 1)
        else:
            dist.recv(buf, 0)
            dist.send(ack, 0)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    if rank == 0:
        queue.put(statistics.median(times))
    dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", choices=tuple(LAYOUT_SETS), default="hetero")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length of the timed hand-offs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-dir", type=Path, default=None)
    add_mode_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layouts = LAYOUT_SETS[args.layouts]
    mode = mode_from_args(args, max(layout.num_gpus for layout in layouts))
    require_cluster_packages()
    tokens, repeats = (64, 2) if mode.tiny else (args.tokens, args.repeats)
    check_lengths, max_tokens = ([20, 45], 6) if mode.tiny else ([37, 512, 2048], 16)
    folder = model_folder(args.shape, mode,
                          args.model_dir or Path(tempfile.mkdtemp(prefix="pdserve-models-")))
    from engine.loader.source import open_model

    vocab = open_model(str(folder)).config.vocab_size
    checks = prompts_of(vocab, check_lengths, seed=1)
    timed = prompts_of(vocab, [tokens] * repeats, seed=2)
    start_ray(mode)
    num_blocks = 512 if mode.tiny else None
    rows = [asyncio.run(run_layout(folder, mode, layout, checks, timed, max_tokens, num_blocks))
            for layout in layouts]
    reference, prefill_s, token2_s = colocated_reference(folder, mode, timed)
    want = [o.token_ids[-max_tokens:] for o in reference.generate(checks, _greedy(max_tokens))]
    num_bytes = kv_bytes(folder, tokens, mode)
    same = next(r for r in rows if r["layout"] == SAME.name)
    for row, layout in zip(rows, layouts):
        row["output_checks"] = [first_difference(reference, p, got, w)
                                for p, got, w in zip(checks, row.pop("tokens"), want)]
        pairs = max(layout.prefill.tp, layout.decode.tp)  # rank pairs moving bytes at once
        row["kv_bytes"], row["rank_pairs"] = num_bytes, pairs
        row["raw_pair_s"] = raw_send_recv_s(num_bytes // pairs, mode)
        row["window_vs_same_layout"] = (row["transfer_window_s"] / same["transfer_window_s"]
                                        if same["transfer_window_s"] else None)
        row["ttft_added_s"] = row["ttft_s"] - prefill_s
        row["token2_added_fraction"] = row["token2_s"] / token2_s - 1
    reference.shutdown()
    ok = all(c["equal"] or c.get("near_tie") for r in rows for c in r["output_checks"])
    payload = {"layouts": args.layouts, "shape": args.shape, "tiny": mode.tiny,
               "facts": gpu_facts(), "colocated_prefill_s": prefill_s,
               "colocated_token2_s": token2_s, "outputs_match": ok, "rows": rows}
    path = write_json(mode, f"layout_handoff_{args.layouts}", payload)
    for row in rows:
        print({k: v for k, v in row.items() if k != "output_checks"})
    print(f"outputs match: {ok}; wrote {path}")
    return 0 if ok else 1


def _greedy(n: int):
    from engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


if __name__ == "__main__":
    sys.exit(main())
