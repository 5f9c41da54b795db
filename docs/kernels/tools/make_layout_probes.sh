#!/usr/bin/env bash
# The variants of ab-layout-*.json (ab_grouped_variants.py, set "layout"):
# what a weight layout made for the kernel could buy, before building one.
#   new                 the kernel as shipped
#   probe_contig        each block reads its k-tile as one contiguous run of
#                       DRAM (other bytes than the real weights: the output
#                       is wrong, the traffic is what a re-laid-out copy
#                       would cause)
#   probe_nomma         the copy pipeline alone (no dequantization, no mma):
#                       the ceiling of today's access pattern
#   probe_contig_nomma  the same for the contiguous runs
#   probe_stagger[_nomma], probe_contig_stagger_nomma: block b fetches k-tile
#                       (kt + b) % KT at step kt (wrong sums, same traffic):
#                       do blocks in step read addresses DRAM serves badly?
# Run from the repository root; writes xp/.
set -euo pipefail
mkdir -p xp
src=moefuse_runtime/cuda/grouped_gemm.cuh
cp "$src" xp/new.cuh
contig='s|q_src\[j\] = static_cast<unsigned>(row \* WORDS + (i % B_CHUNKS) \* 4);|q_src[j] = static_cast<unsigned>(((size_t)expert * ROWS + n_tile * BN) * WORDS + i * 4);|; s|w + q_src\[j\] + kt \* (BK \* BITS / 32)|w + q_src[j] + kt * (BN * B_CHUNKS * 4)|'
nomma='s|^          mma_ktile_regs(kt, u);$|          (void)u;|'
stagger='/auto fetch_gmem = /,/cp_async_commit();/{s|if (kt < KT) {|if (kt < KT) {\n      const int ktr = (kt + static_cast<int>(blockIdx.x % KT)) % KT;|; s|kt \* BK|ktr * BK|g; s|kt \* (BK \* BITS / 32)|ktr * (BK * BITS / 32)|; s|kt \* (BN \* B_CHUNKS \* 4)|ktr * (BN * B_CHUNKS * 4)|}'
sed "$contig" "$src" > xp/probe_contig.cuh
sed "$stagger" "$src" > xp/probe_stagger.cuh
sed "$stagger; $nomma" "$src" > xp/probe_stagger_nomma.cuh
sed "$contig; $stagger; $nomma" "$src" > xp/probe_contig_stagger_nomma.cuh
sed "$nomma" "$src" > xp/probe_nomma.cuh
sed "$contig; $nomma" "$src" > xp/probe_contig_nomma.cuh
for f in xp/probe_*.cuh; do
  if cmp -s "$src" "$f"; then echo "$f: the sed did not apply" >&2; exit 1; fi
done
grep -c "BN \* B_CHUNKS \* 4" xp/probe_contig*.cuh >/dev/null
grep -c "ktr \* BK" xp/probe_*stagger*.cuh >/dev/null
