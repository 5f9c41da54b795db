#!/usr/bin/env bash
# Run the GPU test files in parallel shards on the lent GPU.
#
# The GPU tests spend most of their time on the CPU (NVRTC compiles, numpy
# float32 references), so one process leaves the GPU idle; N shards on one
# GPU finish about N times sooner.  Usage:
#   scripts/run_gpu_tests.sh SHARDS LOGDIR [pytest files or node ids...]
# The shards' logs end up in LOGDIR/all.log, also when the script is stopped
# (timeout's TERM): with -v each test's outcome is logged as it ends, so a cut
# run still says what passed. The exit status is the
# worst shard's. Each shard holds its own MLX memory: 8 shards fit an 80 GB
# H100; 14 left too little free memory and install() then (rightly) skipped
# fusion for headroom in most tests.
set -u
shards=$1; logdir=$2; shift 2
mkdir -p "$logdir"
python3 -m pytest --collect-only -q "$@" | grep '::' > "$logdir/ids.txt"
[ -s "$logdir/ids.txt" ] || { echo "run_gpu_tests: no tests collected from: $*"; exit 4; }
pids=()
for ((k = 0; k < shards; k++)); do
  awk -v n="$shards" -v k="$k" '(NR - 1) % n == k' "$logdir/ids.txt" > "$logdir/ids-$k.txt"
  # Node ids hold spaces ("affine 3-bit"): pass them one per line.
  # a session of its own per shard: stopping the script stops its pytest too
  setsid xargs -r -d '\n' -a "$logdir/ids-$k.txt" python3 -m pytest -v -rs -p no:cacheprovider \
    > "$logdir/shard-$k.log" 2>&1 &
  pids+=($!)
done
collect() {
  cat "$logdir"/shard-*.log > "$logdir/all.log"; rm -f "$logdir"/ids-*.txt "$logdir"/shard-*.log
}
stop() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null; done; }
trap 'stop; wait; collect; echo "run_gpu_tests: stopped"; exit 124' TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
collect
grep -E "passed|failed|error|Error|assert|SKIPPED" "$logdir/all.log" | tail -n 40
exit "$status"
