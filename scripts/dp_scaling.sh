#!/usr/bin/env bash
# Data-parallel scaling of bench_small on 1 -> 2 GPUs (same per-GPU batch: one 16K-token sequence per
# GPU and step), measured by dsa-train's own tokens/s over the last log window. Needs a built
# build-gpu/ (scripts/gpu_check.sh) and a corpus; prints the efficiency tok/s(2) / (2 tok/s(1)).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${DSA_GPU_BUILD:-build-gpu}
OUT=${OUT:-/tmp/dsa_gpu}
DATA=${1:-deps/corpus/tiny}
SEQ=${DSA_SEQ:-16384}
common=(recipes/bench_small.yaml "data.shards=$DATA" data.keep_documents_contiguous=false "stage_defaults.seq_len=$SEQ"
  stages.dense.steps=12 stages.dense.warmup_steps=2 stages.dense.eval_interval=0 stages.dense.eval_batches=0
  stages.dense.log_interval=4 checkpointing.every_steps=0 parallelism.dp=0 device=cuda --stage dense)
rate() { grep -E "^\[dense\] step +12/12" "$1" | sed -E 's/.*\| ([0-9.]+)(K?) tok\/s.*/\1 \2/' |
  awk '{ print ($2 == "K" ? $1 * 1000 : $1) }'; }
"$BUILD/bin/dsa-train" "${common[@]}" stages.dense.global_batch=1 output_dir="$OUT/dp1" >"$OUT/dp1.log" 2>&1 ||
  { tail -5 "$OUT/dp1.log"; exit 1; }
mpirun -np 2 --allow-run-as-root -x NCCL_NVLS_ENABLE=0 "$BUILD/bin/dsa-train" "${common[@]}" \
  stages.dense.global_batch=2 output_dir="$OUT/dp2" >"$OUT/dp2.log" 2>&1 || { tail -5 "$OUT/dp2.log"; exit 1; }
r1=$(rate "$OUT/dp1.log"); r2=$(rate "$OUT/dp2.log")
echo "[dp_scaling] bench_small dense stage at $SEQ: 1 GPU $r1 tok/s, 2 GPUs $r2 tok/s," \
  "efficiency $(awk -v a="$r1" -v b="$r2" 'BEGIN { printf "%.1f%%", 100 * b / (2 * a) }')"
