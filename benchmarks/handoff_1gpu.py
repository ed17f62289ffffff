"""The prefill side of the KV hand-off, measured on one GPU (the full measurement,
`benchmarks/disagg_gpu.py`, needs two NVLinked GPUs in one host).

Llama-3-8B shape, random bf16 weights, 512 / 2k / 8k-token prompts:
1. Packing: a request's KV gathered per layer with one `pack_blocks` (index_select) each, as
   `KVSender` does before each NCCL send, and scattered back with one `unpack_blocks`
   (index_copy_) per layer, as the receiver does; next to a device copy of the same bytes in the
   same run (both count bytes read + written).
2. Layer-wise overlap: the same prefill through `ModelRunner.execute` with and without an
   `on_layer_done` hook that does the sender's GPU work short of posting the sends: at the last
   layer of each message's layer group, an event on the compute stream, the side stream waits
   on it (`kv_transfer/streams.py`) and packs the group; other layers return at once. Once with
   one layer per message, once with the groups the prefill worker picks
   (`layers_per_message_for`, >= 32 MiB a message): what streaming the KV while computing costs
   the prefill (the time to first token).
Run: python benchmarks/handoff_1gpu.py  -> table, benchmarks/results/handoff_1gpu_<gpu>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (bench_ms, copy_bandwidth_gbs, device_info,  # noqa: E402
                                   print_table, wall_ms, write_results)
from benchmarks.latency import BS, CFG, PARAMS  # noqa: E402
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.kernels.attention_backend import TritonAttentionBackend  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.plan import PlanBuilder  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402
from kv_transfer.descriptors import DEFAULT_MIN_MESSAGE_BYTES, layers_per_message_for  # noqa: E402
from kv_transfer.packing import pack_blocks, packed_shape, unpack_blocks  # noqa: E402
from kv_transfer.streams import TransferStream  # noqa: E402

TOKENS = (512, 2048, 8192)


def main() -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    num_blocks = 2 * (max(TOKENS) // BS + 1)
    kv = torch.zeros(CFG.num_layers, num_blocks, 2, BS, CFG.num_kv_heads, CFG.head_dim,
                     dtype=torch.bfloat16, device="cuda")
    runner = ModelRunner(model, kv, TritonAttentionBackend(), BS, CFG.vocab_size, "cuda")
    rows = [_measure(runner, kv, n, bw) for n in TOKENS]
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw,
               "model": "Llama-3-8B shape, bf16", "rows": rows}
    path = write_results("handoff_1gpu", payload)
    print_table(rows, ["tokens", "kv_MiB", "pack_ms", "unpack_ms", "copy_ms", "pack_%copy",
                       "unpack_%copy", "prefill_ms", "layers_per_msg", "per_layer_%",
                       "grouped_%"])
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {path}")


def _measure(runner: ModelRunner, kv: torch.Tensor, n: int, bw: float) -> dict:
    num_blocks = -(-n // BS)
    # every other block: a request's blocks are scattered over the pool, not contiguous
    ids = torch.arange(0, 2 * num_blocks, 2, device="cuda")
    layer_shape = packed_shape(kv, num_blocks, slice(0, 1))
    buffers = [torch.empty(layer_shape, dtype=kv.dtype, device="cuda") for _ in range(kv.shape[0])]
    num_bytes = sum(b.numel() * b.element_size() for b in buffers)
    flat = torch.empty(num_bytes // 2, dtype=kv.dtype, device="cuda")
    flat_copy = torch.empty_like(flat)

    def pack_all() -> None:
        for layer, buf in enumerate(buffers):
            pack_blocks(kv, ids, slice(layer, layer + 1), out=buf)

    def unpack_all() -> None:
        for layer, buf in enumerate(buffers):
            unpack_blocks(kv, ids, slice(layer, layer + 1), buf)

    pack_ms, unpack_ms = bench_ms(pack_all), bench_ms(unpack_all)
    copy_ms = bench_ms(lambda: flat_copy.copy_(flat))
    stream = TransferStream("cuda")
    layer_bytes = num_bytes // kv.shape[0]
    grouped = layers_per_message_for(kv.shape[0], layer_bytes, 1, DEFAULT_MIN_MESSAGE_BYTES)
    group_buffers = {}

    def hook_for(per_message: int):
        def hook(layer: int) -> None:  # the sender's GPU work once a group is written
            if (layer + 1) % per_message and layer + 1 != kv.shape[0]:
                return
            layers = slice(layer // per_message * per_message, layer + 1)
            key = (layers.start, layers.stop)
            if key not in group_buffers:
                group_buffers[key] = torch.empty(packed_shape(kv, num_blocks, layers),
                                                 dtype=kv.dtype, device="cuda")
            stream.wait_for_compute()
            with stream.use():
                pack_blocks(kv, ids, layers, out=group_buffers[key])
        return hook

    prompt = torch.randint(0, CFG.vocab_size, (n,)).tolist()
    table = ids.tolist()
    planner = PlanBuilder()

    def prefill(on_layer_done=None) -> None:
        request = Request(f"p{n}", prompt, SamplingParams(**PARAMS), 0, 1 << 20)
        chunk = ScheduledChunk(request, 0, n, table, True)
        runner.execute(planner.build(SchedulerOutput([chunk])), on_layer_done).token_ids.tolist()

    wall_ms(prefill, reps=1, warmup=2)
    variants = {"plain": None, "per_layer": hook_for(1), "grouped": hook_for(grouped)}
    times = {name: [] for name in variants}
    for _ in range(2):  # alternate, and keep each one's best: clocks drift between runs
        for name, hook in variants.items():
            times[name].append(wall_ms(lambda: prefill(hook), reps=7, warmup=1))
    best = {name: min(t) for name, t in times.items()}
    return {"tokens": n, "kv_MiB": num_bytes / 2**20, "pack_ms": pack_ms, "unpack_ms": unpack_ms,
            "copy_ms": copy_ms, "pack_%copy": 100 * copy_ms / pack_ms,
            "unpack_%copy": 100 * copy_ms / unpack_ms,
            "pack_GB/s": 2 * num_bytes / pack_ms / 1e6, "prefill_ms": best["plain"],
            "layers_per_msg": grouped, "prefill_per_layer_ms": best["per_layer"],
            "prefill_grouped_ms": best["grouped"],
            "per_layer_%": 100 * (best["per_layer"] - best["plain"]) / best["plain"],
            "grouped_%": 100 * (best["grouped"] - best["plain"]) / best["plain"]}


if __name__ == "__main__":
    main()
