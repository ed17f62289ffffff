"""Sampling at TP=2 over Gloo on CPU: gathering the logits vs sampling the vocab slices.

Two rank processes (one torch thread each) form a TP=2 Gloo group. Each step every rank holds
its half of a [batch, vocab] fp32 logits matrix (what `ParallelLMHead` gives without
gathering) and draws the batch's ids one of two ways:

- gather: `all_gather_last_dim` of the slices, then `Sampler` on the full logits (what every
  rank did before engine/tp_sampler.py; still the path of top-p steps);
- slices: `sample_vocab_parallel` (its no-gather path).

Rows are all greedy, or all seeded temperature 0.8 with logprobs. Per step: bytes each rank
receives through the tensor group (the payload of every collective, counted by wrapping the
ParallelContext methods: an all-gather brings (tp - 1) x the local tensor) and the median
wall time on rank 0 (each step ends in a collective, so both ranks' steps are the same
length), the two paths interleaved step by step. Both paths must draw the same ids (checked)
and logprobs are compared: the one-rank float32 log_softmax itself is off by up to ~1e-5 at
vocab 128256 against float64, the slices' per-slice sums combined in float64 by ~1e-7.
Run: python benchmarks/tp_sampling.py  -> table, benchmarks/results/tp_sampling_cpu.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py would shadow a package

import torch  # noqa: E402

from engine.layers.embedding import vocab_slice  # noqa: E402
from engine.parallel import ParallelContext, init_parallel_context  # noqa: E402
from engine.plan import SamplingRow  # noqa: E402
from engine.sampler import Sampler, SamplingTensors  # noqa: E402
from engine.tp_sampler import sample_vocab_parallel  # noqa: E402

TP = 2
VOCABS = (49152, 128256)
BATCHES = (1, 64)
MODES = ("greedy", "temperature+logprobs")
WARMUP, REPS = 2, 21
TIMEOUT_S = 120.0
OUT = Path(__file__).resolve().parent / "results" / "tp_sampling_cpu.json"


def rows_of(mode: str, batch: int) -> list[SamplingRow]:
    if mode == "greedy":
        return [SamplingRow(0.0, 0, 1.0, 0.0, 1.0, False, i, 3) for i in range(batch)]
    return [SamplingRow(0.8, 0, 1.0, 0.0, 1.0, True, 1000 + i, 3) for i in range(batch)]


def local_logits(vocab: int, batch: int, rank: int) -> torch.Tensor:
    full = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab + batch)) * 3
    first, width = vocab_slice(vocab, rank, TP)
    return full[:, first:first + width].contiguous()


class ByteCounter:
    """Adds up the payload each rank receives through the tensor group's collectives."""

    def __init__(self) -> None:
        self.bytes = 0
        self.collectives = 0
        for name in ("all_gather_last_dim", "all_gather_stacked", "all_reduce_max", "all_reduce"):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        method = getattr(ParallelContext, name)

        def counted(ctx, x, _method=method):
            self.collectives += 1
            self.bytes += (ctx.tp_size - 1) * x.numel() * x.element_size()
            return _method(ctx, x)

        setattr(ParallelContext, name, counted)


def gather_path(local: torch.Tensor, rows, vocab: int, ctx: ParallelContext):
    full = ctx.all_gather_last_dim(local)[:, :vocab]
    return Sampler()(full, SamplingTensors.from_rows(rows, vocab, "cpu"))


def slice_path(local: torch.Tensor, rows, vocab: int, ctx: ParallelContext):
    return sample_vocab_parallel(local, rows, vocab, ctx)


PATHS = {"gather": gather_path, "slices": slice_path}


def measure(local, rows, vocab, ctx, counter) -> dict:
    """Both paths, interleaved step by step (the 2-core box drifts): median and min ms, bytes
    and collectives per step, and the last step's ids and logprobs."""
    times = {name: [] for name in PATHS}
    traffic = {name: [0, 0] for name in PATHS}
    outs = {}
    for rep in range(WARMUP + REPS):
        for name, path in PATHS.items():
            counter.bytes = counter.collectives = 0
            started = time.perf_counter()
            outs[name] = path(local, rows, vocab, ctx)
            if rep >= WARMUP:
                times[name].append(time.perf_counter() - started)
                traffic[name][0] += counter.bytes
                traffic[name][1] += counter.collectives
    record = dict(same_ids=torch.equal(outs["gather"].token_ids, outs["slices"].token_ids))
    logprobs = [outs[name].logprobs for name in PATHS]
    record["max_logprob_diff"] = (0.0 if logprobs[0] is None
                                  else float((logprobs[0] - logprobs[1]).abs().max()))
    for name in PATHS:
        record.update({f"{name}_ms_median": 1e3 * statistics.median(times[name]),
                       f"{name}_ms_min": 1e3 * min(times[name]),
                       f"{name}_bytes_per_step": traffic[name][0] // REPS,
                       f"{name}_collectives_per_step": traffic[name][1] / REPS})
    return record


def rank_main(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    ctx = init_parallel_context(store, rank, TP, 1, 1, "cpu", TIMEOUT_S)
    counter = ByteCounter()
    records = []
    for vocab in VOCABS:
        for batch in BATCHES:
            local = local_logits(vocab, batch, rank)
            for mode in MODES:
                record = measure(local, rows_of(mode, batch), vocab, ctx, counter)
                records.append(dict(vocab=vocab, batch=batch, mode=mode, **record))
    if rank == 0:
        queue.put(records)


def main() -> None:
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, store.port, queue)) for r in range(TP)]
    for p in procs:
        p.start()
    load_before = os.getloadavg()[0]
    records = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    print(f"{'vocab':>7} {'batch':>5} {'mode':<22} {'gather ms':>9} {'slices ms':>9} "
          f"{'gather B/step':>13} {'slices B/step':>13} same")
    for r in records:
        print(f"{r['vocab']:>7} {r['batch']:>5} {r['mode']:<22} {r['gather_ms_median']:>9.2f} "
              f"{r['slices_ms_median']:>9.2f} {r['gather_bytes_per_step']:>13} "
              f"{r['slices_bytes_per_step']:>13} {r['same_ids']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(
        device="cpu", cores=os.cpu_count(), tp=TP, backend="gloo (loopback)",
        torch_threads_per_rank=1, torch=torch.__version__, reps=REPS,
        load_average_1m=[load_before, os.getloadavg()[0]],  # the box is shared: noise
        bytes="payload each rank receives per step through the tensor group",
        records=records), indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
