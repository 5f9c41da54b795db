#!/usr/bin/env bash
# Run the GPU test files in parallel shards on the lent GPU.
#
# The GPU tests spend most of their time on the CPU (NVRTC compiles, numpy
# float32 references), so one process leaves the GPU idle; N shards on one
# GPU finish about N times sooner.  Usage:
#   scripts/run_gpu_tests.sh SHARDS LOGDIR [pytest files or node ids...]
# The shards' logs end up in LOGDIR/all.log; the exit status is the worst shard's.
set -u
shards=$1; logdir=$2; shift 2
mkdir -p "$logdir"
python3 -m pytest --collect-only -q "$@" | grep '::' > "$logdir/ids.txt"
[ -s "$logdir/ids.txt" ] || { echo "run_gpu_tests: no tests collected from: $*"; exit 4; }
pids=()
for ((k = 0; k < shards; k++)); do
  awk -v n="$shards" -v k="$k" '(NR - 1) % n == k' "$logdir/ids.txt" > "$logdir/ids-$k.txt"
  # Node ids hold spaces ("affine 3-bit"): pass them one per line.
  xargs -r -d '\n' -a "$logdir/ids-$k.txt" python3 -m pytest -q -rs -p no:cacheprovider \
    > "$logdir/shard-$k.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
cat "$logdir"/shard-*.log > "$logdir/all.log"; rm -f "$logdir"/ids-*.txt "$logdir"/shard-*.log
grep -E "passed|failed|error|Error|assert|SKIPPED" "$logdir/all.log" | tail -n 40
exit "$status"
