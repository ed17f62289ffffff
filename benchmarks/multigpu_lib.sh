# Sourced by benchmarks/multigpu_suite.sh and multigpu4_suite.sh (issues 20 and 21): the
# environment, the dry-run switch and the helpers both suites use. Expects OUT, summary and
# GPUS (how many GPUs the suite needs) set by the caller.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OUT
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .tok ] && export PDSERVE_TEST_TOKENIZER_DIR=$PWD/.tok PDSERVE_BENCH_TOKENIZER=$PWD/.tok
PY=${PY:-python3}
MODELS=${MODELS:-/tmp/pdserve-models}  # random-weight folders, written once, reused by parts
mkdir -p "$OUT"
if [ "${DRY_RUN:-0}" = 1 ]; then  # every part on CPU: tiny models, Gloo, JSON under $OUT
  DRY=(--device cpu --tiny --out-dir "$OUT"); MODE=("${DRY[@]}"); NEED=0
else
  DRY=(); MODE=(--model-dir "$MODELS"); NEED=$GPUS
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv 2>&1 | tee -a "$summary"
  nvidia-smi topo -m 2>&1 | head -n $((GPUS + 2)) >> "$summary"
fi

source "$(dirname "${BASH_SOURCE[0]}")/suite_run.sh"

enough_gpus() {  # enough_gpus PART KIND: true if this machine has $NEED GPUs, else says so
  local have
  have=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$have" -lt "$NEED" ]; then
    echo "== $1: SKIPPED: needs $NEED GPUs, this machine has $have (device kind $2)" \
      | tee -a "$summary"
    return 1
  fi
}

install_wheels() {  # .whl/ (shared/device/make-wheels.sh): Ray and grpcio 1.85.1 into /tmp/site
  if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || echo "install failed" >> "$summary"
  fi
  $PY -c 'import ray, grpc; print("ray", ray.__version__, "grpcio", grpc.__version__)' \
    2>&1 | tail -n 1 | tee -a "$summary"
}
