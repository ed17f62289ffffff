"""Sweep the prefill attention kernel's tile configurations, keep the best, compare it with
torch's flash SDPA.

1. Correctness first: each candidate (engine/kernels/prefill_attention_configs.py) runs a small
   paged case (a whole prompt and a chunk after cached blocks) against float32 math attention;
   a wrong or failing candidate (compile error, out of shared memory) is rejected.
2. Each correct candidate is timed at 8k tokens, bf16, Llama-3-8B heads (32 q / 8 kv, head_dim
   128), causal, K/V in shuffled 16-token blocks. Candidates run in order of promise (six plain
   tiles, switches on the two fastest, the other tiles) until --budget-s less --ws-s (compile
   time included) is spent. Warp-specialized variants of the two fastest run after step 4 in
   the --ws-s left (the least certain to compile or run: the results so far are saved first);
   if one wins, the JSON and the swept kernel's numbers are updated.
3. The best goes into engine/kernels/prefill_attention_configs.json for this GPU, bf16 and fp16
   (tensor-core rates are the same), group 4 / head_dim 128.
4. The swept kernel (through the JSON, as the engine calls it) and the pre-sweep default against
   SDPA pinned to the flash backend (is_causal, GQA) at 4k, 8k, 32k tokens, bf16 and fp16, and a
   chunk of 4k after 4k cached (against FlashAttention-2's bottom-right causal mask through
   aten._flash_attention_forward). TFLOP/s count the causal pairs: 4 * pairs * Hq * D.

Run: python benchmarks/prefill_attention_sweep.py [--budget-s 150] [--no-ws] [--dry-run]
  -> benchmarks/results/prefill_attention_<gpu>.json (and the configs JSON)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import bench_ms, device_info, print_table, write_results  # noqa: E402
from engine.attention.metadata import SeqGroup  # noqa: E402
from engine.kernels import prefill_attention_configs as tiles  # noqa: E402
from engine.kernels.prefill_attention import prefill_attention  # noqa: E402
from engine.kernels.prefill_attention_configs import PrefillTileConfig as Cfg  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
SWEEP_TOKENS = 8192
DEVICE, SWEEP_DTYPE = "cuda", torch.bfloat16  # a CPU smoke test swaps them (interpreter)
# sm_90 AOT compiles (Triton 3.9, CPU) showed M128N64w4 and M128N128w4 spilling and N128 at
# s4 the same two-buffer pipeline as s3: left out
PLAIN = [Cfg(128, 64, 8, 3),  # the pre-sweep default first: the baseline
         Cfg(128, 128, 8, 3), Cfg(128, 128, 8, 2), Cfg(128, 64, 8, 4), Cfg(64, 64, 4, 3),
         Cfg(64, 128, 4, 3), Cfg(128, 64, 8, 2), Cfg(128, 32, 8, 4), Cfg(64, 64, 4, 4),
         Cfg(64, 32, 4, 4), Cfg(64, 128, 4, 2)]
SWITCHES = [dict(table_vec=True), dict(heads_first=True), dict(pack_gqa=True),
            dict(pack_gqa=True, table_vec=True)]
WARP_SPEC = [dict(warp_specialize=True), dict(warp_specialize=True, table_vec=True)]


def paged(q_lens: list[int], cached: list[int], dtype: torch.dtype, gen: torch.Generator):
    """Dense per-sequence K/V [ctx, Hkv, D] and the same in a shuffled paged cache (table
    width a multiple of 16 so that every case compiles the kernel specialization of 8k)."""
    ctx = [q + c for q, c in zip(q_lens, cached)]
    nblocks = [-(-c // BS) for c in ctx]
    width = -(-max(nblocks) // 16) * 16
    kv = torch.randn(sum(nblocks) + 1, 2, BS, HKV, D, device=DEVICE, generator=gen).to(dtype)
    perm = torch.randperm(sum(nblocks), device=DEVICE, generator=gen).to(torch.int32)
    tables = torch.zeros(len(ctx), width, device=DEVICE, dtype=torch.int32)
    dense, used = [], 0
    for b, (c, nb) in enumerate(zip(ctx, nblocks)):
        ids = perm[used: used + nb]
        used += nb
        tables[b, :nb] = ids
        dense.append(kv[ids.long()].transpose(0, 1).reshape(2, nb * BS, HKV, D)[:, :c])
    qs = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEVICE,
                      dtype=torch.int32)
    group = SeqGroup(tables, torch.tensor(ctx, device=DEVICE, dtype=torch.int32), qs,
                     max(q_lens), max(ctx))
    return kv, group, dense


def reference(q: torch.Tensor, dense: list, q_lens: list[int]) -> torch.Tensor:
    """float32 math attention per sequence, causal aligned bottom-right (the chunk's last)."""
    outs, start = [], 0
    for (k, v), n in zip(dense, q_lens):
        qd = q[start: start + n].float().transpose(0, 1)
        kd = k.float().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
        vd = v.float().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
        mask = torch.ones(n, k.shape[0], device=DEVICE, dtype=torch.bool).tril(k.shape[0] - n)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).transpose(0, 1))
        start += n
    return torch.cat(outs)


def check(cfg: Cfg, case) -> float:
    """Relative error of `cfg` on the small case (raises on a compile or launch failure)."""
    q, kv, group, ref = case
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, group, D ** -0.5, out, config=cfg)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return ((out.float() - ref).norm() / ref.norm()).item()


def causal_tflops(ms: float, q_len: int, cached: int) -> float:
    pairs = q_len * cached + q_len * q_len / 2
    return 4 * pairs * HQ * D / ms / 1e9


def on_fastest(results: list[dict], switches: list[dict]) -> list[Cfg]:
    """`switches` on the two fastest plain tiles timed so far."""
    plain = sorted((r for r in results if r.get("ms") and r["cfg"] in PLAIN), key=lambda r: r["ms"])
    return [Cfg(**{**r["cfg"].to_json(), **s}) for s in switches for r in plain[:2]]


def problems():
    """The small correctness case (a prompt, a chunk after cached blocks) with its float32
    reference, and the 8k timing case."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q_lens, cached = [300, 77], [0, 200]
    kv, group, dense = paged(q_lens, cached, SWEEP_DTYPE, gen)
    q = torch.randn(sum(q_lens), HQ, D, device=DEVICE, generator=gen).to(SWEEP_DTYPE)
    case = (q, kv, group, reference(q, [tuple(x) for x in dense], q_lens))
    bkv, bgroup, _ = paged([SWEEP_TOKENS], [0], SWEEP_DTYPE, gen)
    bq = torch.randn(SWEEP_TOKENS, HQ, D, device=DEVICE, generator=gen).to(SWEEP_DTYPE)
    return case, (bq, bkv, bgroup, torch.empty_like(bq))


def try_config(cfg: Cfg, case, timing) -> dict:
    row = {"cfg": cfg, "config": cfg.label()}
    t0 = time.perf_counter()
    try:
        row["rel_err"] = check(cfg, case)
        row["compile_s"] = time.perf_counter() - t0
        if not row["rel_err"] < 2e-2:
            row["status"] = "wrong"
            return row
        bq, bkv, bgroup, bout = timing
        row["ms"] = bench_ms(lambda: prefill_attention(bq, bkv, bgroup, D ** -0.5, bout,
                                                       config=cfg), 10, 40)
        row["TFLOP/s"] = causal_tflops(row["ms"], SWEEP_TOKENS, 0)
        row["status"] = "ok"
    except Exception as exc:  # compile errors, out of resources: rejected, sweep goes on
        row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    return row


def sweep(phase_list: list, deadline: float, problem, results: list[dict], progress) -> bool:
    """Runs the phases' candidates (a list of configs, or switches for `on_fastest`) into
    `results` until `deadline` (perf_counter); False when a launch fault lost the context."""
    case, timing = problem
    queue, todo = [], list(phase_list)
    while True:
        while not queue and todo:
            phase = todo.pop(0)
            queue = list(phase) if isinstance(phase[0], Cfg) else on_fastest(results, phase)
        if not queue or time.perf_counter() > deadline:
            return True
        cfg = queue.pop(0)
        if any(r["cfg"] == cfg for r in results):
            continue
        results.append(try_config(cfg, case, timing))
        progress(results)
        try:
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        except RuntimeError:  # a launch fault poisons the context: nothing more can run
            results[-1]["status"] += " (CUDA context lost)"
            return False


def sdpa_flash(q_len: int, cached: int, dtype: torch.dtype, gen: torch.Generator):
    """A callable timing torch's flash attention on dense K/V, and the backend used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = q_len + cached
    q = torch.randn(1, q_len, HQ, D, device=DEVICE, generator=gen).to(dtype)
    k = torch.randn(1, ctx, HKV, D, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn_like(k)
    if cached:  # FlashAttention-2 aligns the causal mask bottom-right when q_len < ctx
        def fa2():
            return torch.ops.aten._flash_attention_forward(
                q, k, v, None, None, q_len, ctx, 0.0, True, False, scale=D ** -0.5)
        try:
            fa2()
            return fa2, "aten._flash_attention_forward"
        except (RuntimeError, TypeError):
            mask = torch.ones(q_len, ctx, device=DEVICE, dtype=torch.bool).tril(cached)
            qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))
            return (lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                           enable_gqa=True)), "sdpa(mask)"
    qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))

    def flash(kk, vv, gqa):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qd, kk, vv, is_causal=True, enable_gqa=gqa)
    try:
        flash(kd, vd, True)
        return (lambda: flash(kd, vd, True)), "sdpa flash (enable_gqa)"
    except RuntimeError:
        kr, vr = (x.repeat_interleave(HQ // HKV, 1) for x in (kd, vd))
        return (lambda: flash(kr, vr, False)), "sdpa flash (K/V repeated)"


CASES = [(dtype, q_len, cached) for dtype in (torch.bfloat16, torch.float16)
         for q_len, cached in [(4096, 0), (8192, 0), (32768, 0), (4096, 4096)]]


def compare(default: Cfg, earlier: list[dict] | None = None) -> list[dict]:
    """The swept kernel (JSON lookup, as the engine calls it) and the default tiles vs flash
    SDPA; with `earlier` rows, only the swept kernel is measured again."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    rows = []
    for i, (dtype, q_len, cached) in enumerate(CASES):
        kv, group, _ = paged([q_len], [cached], dtype, gen)
        q = torch.randn(q_len, HQ, D, device=DEVICE, generator=gen).to(dtype)
        out = torch.empty_like(q)
        swept = tiles.get_config(q.device, dtype, D, HQ // HKV)
        ms = bench_ms(lambda: prefill_attention(q, kv, group, D ** -0.5, out))
        if earlier:
            row = dict(earlier[i])
        else:
            base_ms = bench_ms(lambda: prefill_attention(q, kv, group, D ** -0.5, out,
                                                         config=default))
            ref, backend = sdpa_flash(q_len, cached, dtype, gen)
            ref_ms = bench_ms(ref)
            row = {"dtype": str(dtype).removeprefix("torch."), "q_len": q_len, "cached": cached,
                   "default_TFLOP/s": causal_tflops(base_ms, q_len, cached), "sdpa_ms": ref_ms,
                   "sdpa_TFLOP/s": causal_tflops(ref_ms, q_len, cached), "sdpa": backend}
            del ref
        row.update({"config": swept.label(), "ms": ms, "TFLOP/s": causal_tflops(ms, q_len, cached),
                    "ratio": row["sdpa_ms"] / ms})
        rows.append(row)
        del kv, q, out
        torch.cuda.empty_cache()
    return rows


def store_best(results: list[dict], gpu: str, payload: dict, write: bool) -> dict:
    """The fastest correct row; written into the configs JSON for bf16 and fp16."""
    ok = [r for r in results if r.get("ms")]
    if not ok:
        raise SystemExit("no candidate passed the correctness check")
    best = min(ok, key=lambda r: r["ms"])
    payload["best"] = best["config"]
    if write:
        for dtype in (torch.bfloat16, torch.float16):
            tiles.write_config(tiles.shape_key(gpu, dtype, D, HQ // HKV), best["cfg"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="seconds for the sweep, compile time included")
    ap.add_argument("--no-ws", action="store_true", help="skip warp-specialized candidates")
    ap.add_argument("--ws-s", type=float, default=25.0,
                    help="seconds of the budget kept for the warp-specialized candidates, "
                         "tried after the comparison")
    ap.add_argument("--no-write", action="store_true", help="leave the configs JSON alone")
    ap.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    args = ap.parse_args()
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
    print("plain tiles:", ", ".join(c.label() for c in PLAIN[:6]))
    print("then on the two fastest:", SWITCHES, "; other tiles:",
          ", ".join(c.label() for c in PLAIN[6:]))
    print("after the comparison:", [] if args.no_ws else WARP_SPEC)
    if args.dry_run or not torch.cuda.is_available():
        print("dry run" if args.dry_run else "no CUDA device: nothing timed")
        return
    t0 = time.perf_counter()
    payload = {"device": device_info(), "sweep_tokens": SWEEP_TOKENS, "heads": [HQ, HKV, D],
               "budget_s": args.budget_s}

    def progress(results):
        row = results[-1]
        print(f"[{time.perf_counter() - t0:6.1f}s] {row['config']:<28} {row['status'][:90]} "
              f"{row.get('TFLOP/s', 0):.0f} TFLOP/s", flush=True)
        payload["sweep"] = [{k: v for k, v in r.items() if k != "cfg"} for r in results]
        write_results("prefill_attention", payload)  # kept if a later candidate hangs

    problem, results = problems(), []
    gpu = tiles.device_name(torch.device("cuda", torch.cuda.current_device()))
    ws_s = 0.0 if args.no_ws else min(args.ws_s, args.budget_s / 3)
    alive = sweep([PLAIN[:6], SWITCHES, PLAIN[6:]], t0 + args.budget_s - ws_s, problem, results,
                  progress)
    best = store_best(results, gpu, payload, not args.no_write)
    if not alive:
        raise SystemExit(f"CUDA context lost at {results[-1]['config']}; best so far "
                         f"{best['config']} written; rerun with --no-ws to compare")
    default = tiles.default_config(torch.bfloat16, D)
    payload["compare"] = compare(default)
    write_results("prefill_attention", payload)
    if ws_s:  # last: the candidates least certain to compile (or to run) on this Triton
        print("warp specialization:", flush=True)
        sweep([WARP_SPEC], time.perf_counter() + ws_s, problem, results, progress)
        if store_best(results, gpu, payload, not args.no_write) is not best:
            payload["compare"] = compare(default, payload["compare"])
    payload["total_s"] = time.perf_counter() - t0
    path = write_results("prefill_attention", payload)
    print_table(sorted(payload["sweep"], key=lambda r: r.get("ms") or 1e9)[:10],
                ["config", "status", "compile_s", "ms", "TFLOP/s", "rel_err"])
    print()
    print_table(payload["compare"], ["dtype", "q_len", "cached", "config", "ms", "TFLOP/s",
                                     "default_TFLOP/s", "sdpa_TFLOP/s", "ratio", "sdpa"])
    print(f"best {payload['best']} on {gpu}; {payload['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
