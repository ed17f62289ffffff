#!/usr/bin/env bash
# Issue 21 on a four-GPU machine (nvidia-h200-x4), from the repository root:
#   bash benchmarks/multigpu4_suite.sh [install] [handoff_tp2] [hetero] [tp4] [ep4]
#   (default: install handoff_tp2 hetero)
# install     : .whl/*.whl into /tmp/site: Ray and grpcio 1.85.1, which the GPU machines lack
#               (build .whl/ with /work/shared/device/make-wheels.sh, < 64 MiB; carry it, and .tok/)
# handoff_tp2 : benchmarks/layout_handoff.py --layouts handoff_tp2: 1P (TP=2) + 1D (TP=2) through
#               the cluster, next to 1P+1D at TP=1: outputs = colocated TP=1, KV transfer time per
#               rank pair vs raw NCCL of the same bytes, TTFT added at 2k
# hetero      : benchmarks/layout_handoff.py --layouts hetero: 2P TP=1 + 1D TP=2 and
#               1P TP=2 + 2D TP=1, re-sharded hand-offs vs the same-layout transfer
# tp4         : benchmarks/tp_latency.py: Llama-3-70B shape (random bf16, 35 GB per GPU at TP=4)
#               TP=4 vs TP=2 decode at batch 1 and 64, fraction of each GPU's HBM roofline.
#               TP=2 holds 70 GB of weights per GPU: H200 only. TP4_LAYERS=40 halves the folder.
# ep4         : benchmarks/tp_latency.py --ep: Qwen3-30B-A3B shape, EP=4 (attention TP=4) vs
#               EP=1 at batch 1, 64, 256; outputs equal; the collectives' share of the step
# Each part checks the GPU count first. Logs and JSON go to $OUT (default /tmp/pdserve-multigpu4)
# and benchmarks/results/; a summary is printed last. One device call runs at most 10 minutes:
# run `install handoff_tp2 hetero`, then `tp4` (the 140 GB folder alone takes minutes to write),
# then `ep4`, each in its own call on the same warm machine (the folders under $MODELS stay).
# Dry run of every part on CPU (tiny models, Gloo): DRY_RUN=1 bash benchmarks/multigpu4_suite.sh
set -u
OUT=${OUT:-/tmp/pdserve-multigpu4}
parts=${*:-install handoff_tp2 hetero}
summary="$OUT/multigpu4_summary.txt"
GPUS=4
mkdir -p "$OUT" && touch "$summary"
source benchmarks/multigpu_lib.sh

for p in $parts; do
  case $p in
    install) install_wheels ;;
    handoff_tp2|hetero)
      enough_gpus "$p" nvidia-h200-x4 || continue
      run "$p" ${LAYOUT_S:-270} $PY benchmarks/layout_handoff.py --layouts "$p" "${MODE[@]}"
      grep -E "^\{'layout'|outputs match|Error" "$OUT/$p.log" | tail -n 8 >> "$summary" ;;
    tp4) enough_gpus tp4 nvidia-h200-x4 || continue
         run tp4 ${TP4_S:-560} $PY benchmarks/tp_latency.py --shape llama-3-70b --tp 4 \
           --baseline-tp 2 --steps 20 --prefill 2048 ${TP4_LAYERS:+--num-layers $TP4_LAYERS} \
           "${MODE[@]}"
         grep -E "^\{'layout'|wrote|Error" "$OUT/tp4.log" | tail -n 5 >> "$summary" ;;
    ep4) enough_gpus ep4 nvidia-h200-x4 || continue
         run ep4 ${EP4_S:-500} $PY benchmarks/tp_latency.py --shape qwen3-30b-a3b --tp 4 --ep \
           --baseline-tp 1 --batches 1,64,256 "${MODE[@]}"
         grep -E "^\{'layout'|wrote|Error" "$OUT/ep4.log" | tail -n 5 >> "$summary" ;;
    *) echo "unknown part $p (install handoff_tp2 hetero tp4 ep4)" | tee -a "$summary" ;;
  esac
done
echo; cat "$summary"
