#!/usr/bin/env bash
# Runs a command on a GPU machine in a clean copy of the committed tree, so that files being
# edited in the working tree at the time of the call cannot leak into a measurement:
#   here:  git archive HEAD | gzip > .head.tgz   (ignored; carried with .whl/ and .tok/)
#   there: bash benchmarks/from_head.sh 'python3 benchmarks/x.py; bash benchmarks/gpu_suite.sh fp8'
# The copy lives in /tmp/pdserve-head; .whl/*.whl are installed into /tmp/site (the packages the
# GPU machines lack, /work/shared/device/README.md), .tok/ (the default tokenizer, saved with
# save_pretrained) is named by PDSERVE_TEST_TOKENIZER_DIR. Result JSON and logs are copied to $OUT.
set -u
here=$PWD
dest=/tmp/pdserve-head
rm -rf "$dest" && mkdir -p "$dest"
tar xzf "$here/.head.tgz" -C "$dest" || { echo "no .head.tgz: make it with git archive"; exit 2; }
[ -d "$here/.tok" ] && cp -r "$here/.tok" "$dest/" && export PDSERVE_TEST_TOKENIZER_DIR=$dest/.tok \
  PDSERVE_BENCH_TOKENIZER=$dest/.tok
if ls "$here"/.whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$here"/.whl/*.whl || echo "wheel install failed"
fi
export PYTHONPATH=/tmp/site:$dest PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/pdserve-out}
mkdir -p "$OUT"
cd "$dest" && echo "commit: $(cat .head_commit 2>/dev/null || echo unknown)"
touch /tmp/pdserve-head.start
bash -c "$*"
rc=$?
# only what this call wrote (the tree holds dozens of older results)
find benchmarks/results engine/kernels -newer /tmp/pdserve-head.start \( -name "*.json" -o -name "*.log" \) \
  -exec cp {} "$OUT/" \; 2>/dev/null
exit $rc
