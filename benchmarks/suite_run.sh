# Sourced by the GPU suites (gpu_suite.sh, moe_suite.sh, multigpu_lib.sh): one timed part.
# Expects OUT (logs) and summary (the summary file) set by the caller.
run() {  # run NAME TIMEOUT_S CMD...: CMD's output to $OUT/NAME.log, its rc and time to the summary
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$summary"
}
