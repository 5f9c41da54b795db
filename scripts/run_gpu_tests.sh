#!/usr/bin/env bash
# Run the GPU test files in parallel shards on the lent GPU.
#
# The GPU tests spend most of their time on the CPU (NVRTC compiles, numpy
# float32 references), so one process leaves the GPU idle; N shards on one
# GPU finish about N times sooner.  Usage:
#   scripts/run_gpu_tests.sh SHARDS LOGDIR [pytest files or node ids...]
#
# Compiled kernels are compiled once, not once per shard:
# - this package's kernel cache is one folder that every shard shares (its
#   writes are atomic: tests/test_jit.py); $GPU_TESTS_STORE names a folder
#   that outlives the run, so that a later run (the other half of the
#   files) reuses what this one compiled;
# - MLX's own cache is not safe to share while it is written (it writes in
#   place), so a warm-up process first runs the first test of each file, and
#   each shard starts from its own copy of the cache that process left.
# The shards' logs end up in LOGDIR/all.log, also when the script is stopped
# (timeout's TERM): with -v each test's outcome is logged as it ends, so a cut
# run still says what passed. The exit status is the worst shard's. Each
# shard holds its own MLX memory: 8 shards fit an 80 GB H100; 14 left too
# little free memory and install() then (rightly) skipped fusion for
# headroom in most tests.
set -u
shards=$1; logdir=$2; shift 2
mkdir -p "$logdir"
caches=$(mktemp -d)
python3 -m pytest --collect-only -q "$@" | grep '::' > "$logdir/ids.txt"
[ -s "$logdir/ids.txt" ] || { echo "run_gpu_tests: no tests collected from: $*"; exit 4; }
pytest_ids() {  # node ids one per line on stdin (they hold spaces: "affine 3-bit")
  xargs -r -d '\n' python3 -m pytest -v -rs -p no:cacheprovider "$@"
}

store=${GPU_TESTS_STORE:-$caches/moefuse}
mkdir -p "$caches/warm" "$store"
ln -s "$store" "$caches/warm/moefuse"
awk -F'::' '!seen[$1]++' "$logdir/ids.txt" > "$logdir/warm-ids.txt"
start=$(date +%s)
MOEFUSE_TEST_CACHE_ROOT="$caches/warm" pytest_ids < "$logdir/warm-ids.txt" > "$logdir/warm.log" 2>&1
echo "run_gpu_tests: warm-up ($(wc -l < "$logdir/warm-ids.txt") tests) took $(( $(date +%s) - start )) s"

pids=()
for ((k = 0; k < shards; k++)); do
  awk -v n="$shards" -v k="$k" '(NR - 1) % n == k' "$logdir/ids.txt" > "$logdir/ids-$k.txt"
  mkdir -p "$caches/$k" && ln -s "$store" "$caches/$k/moefuse"
  [ -d "$caches/warm/mlx" ] && cp -r "$caches/warm/mlx" "$caches/$k/mlx"
  # a session of its own per shard: stopping the script stops its pytest too
  MOEFUSE_TEST_CACHE_ROOT="$caches/$k" setsid bash -c "$(declare -f pytest_ids); pytest_ids" \
    < "$logdir/ids-$k.txt" > "$logdir/shard-$k.log" 2>&1 &
  pids+=($!)
done
collect() {
  cat "$logdir"/shard-*.log > "$logdir/all.log"
  rm -rf "$caches" "$logdir"/ids-*.txt "$logdir"/shard-*.log "$logdir/warm-ids.txt"
}
stop() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null; done; }
trap 'stop; wait; collect; echo "run_gpu_tests: stopped"; exit 124' TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
collect
echo "run_gpu_tests: all shards done after $(( $(date +%s) - start )) s"
grep -E "passed|failed|error|Error|assert|SKIPPED" "$logdir/all.log" | tail -n 40
exit "$status"
