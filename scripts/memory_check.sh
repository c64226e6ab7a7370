#!/usr/bin/env bash
# One call on one GPU (H200): build, the ZeRO GPU tests, then the memory plan against the caching
# allocator's measured peaks, stage by stage:
#   bench-small at 4K and at 16K (ZeRO off), and at 16K with ZeRO-2 (one rank: every sharded path runs)
#   the largest member of the V2-Lite/Moonlight shape family (recipes/v2lite_shape.yaml) that the plan
#   fits on this GPU at 16K with recompute, with its tokens/s
# and prints a markdown table last (plan = the allocator-level prediction: the plan's total less the
# fixed context reserve; error = (plan - measured) / measured).
#
#   bash scripts/memory_check.sh          (logs under $OUT, default /tmp/dsa_memory)
#
# The GPU image has no PCRE2 -dev package: pcre2.h comes from .carry/pcre2 when present (as in
# scripts/gpu_check.sh). Runs write no checkpoint (checkpointing.save=false: the larger model's f32 state
# is tens of GB) and train on uniformly random tokens (`dsa-prep random`): memory does not depend on them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dsa_memory}
mkdir -p "$OUT"
BUILD=${DSA_GPU_BUILD:-build-gpu}
pcre=()
[[ -f .carry/pcre2/pcre2.h ]] && pcre=(-DDSA_PCRE2_INCLUDE="$PWD/.carry/pcre2")
t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real "${pcre[@]}" \
  >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
ninja -C "$BUILD" dsa-train dsa-prep test_gpu_zero >"$OUT/build.log" 2>&1 ||
  { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
echo "[memory_check] build $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
status=0

# The bench-small peak test repeats what the runs below measure: left out here.
"$BUILD/bin/test_gpu_zero" --gtest_filter='-*PlanPeakIsClose*' >"$OUT/test_gpu_zero.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED|  OK|  SKIPPED) |^\[gpu zero\]" "$OUT/test_gpu_zero.log" | sed 's/^/  /'

"$BUILD/bin/dsa-prep" random --out "$OUT/c129k" --vocab 129280 --docs 8 --doc-tokens 20000 >/dev/null || status=1
"$BUILD/bin/dsa-prep" random --out "$OUT/c102k" --vocab 102400 --docs 8 --doc-tokens 20000 >/dev/null || status=1

common=(checkpointing.save=false stage_defaults.eval_batches=0 stage_defaults.eval_interval=0 logging.log_interval=1
        stages.dense.steps=4 stages.dense.warmup_steps=1 stages.warmup.steps=3 stages.warmup.warmup_steps=1
        stages.sparse.steps=4 stages.sparse.warmup_steps=1)
runs=()
train() {  # NAME RECIPE overrides...
  local name=$1 recipe=$2
  shift 2
  local t=$(date +%s)
  "$BUILD/bin/dsa-train" "$recipe" "${common[@]}" output_dir="$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[memory_check] $name: rc $rc, $(( $(date +%s) - t )) s"
  grep -E "^\[memory\] (stage|fits|largest)" "$OUT/$name.log" | sed 's/^/  /'
  [[ $rc == 0 ]] || { status=1; tail -5 "$OUT/$name.log"; }
  runs+=("$name")
}

train bench_small_4k recipes/bench_small.yaml data.shards="$OUT/c129k" stage_defaults.seq_len=4096 stage_defaults.global_batch=4
train bench_small_16k recipes/bench_small.yaml data.shards="$OUT/c129k"
train bench_small_16k_zero2 recipes/bench_small.yaml data.shards="$OUT/c129k" parallelism.zero=2

"$BUILD/bin/dsa-train" recipes/v2lite_shape.yaml --dry-run --fit-layers >"$OUT/fit_layers.log" 2>&1
grep "largest fitting" "$OUT/fit_layers.log"
layers=$(sed -n 's/.*largest fitting with recompute: model.num_hidden_layers=\([0-9]*\).*/\1/p' "$OUT/fit_layers.log")
if [[ -n "$layers" && "$layers" -gt 0 ]]; then
  train "v2lite_${layers}layers_recompute" recipes/v2lite_shape.yaml data.shards="$OUT/c102k" \
    model.num_hidden_layers="$layers" stage_defaults.recompute=true
  # The plan under-estimated if that ran out of memory: the next smaller member then.
  if grep -q "out of device memory" "$OUT/v2lite_${layers}layers_recompute.log"; then
    layers=$((layers - 1))
    train "v2lite_${layers}layers_recompute" recipes/v2lite_shape.yaml data.shards="$OUT/c102k" \
      model.num_hidden_layers="$layers" stage_defaults.recompute=true
  fi
fi
plain=$(sed -n 's/.*largest fitting: model.num_hidden_layers=\([0-9]*\).*/\1/p' "$OUT/fit_layers.log")
if [[ -n "$plain" && "$plain" -gt 0 && $(( $(date +%s) - t0 )) -lt 330 ]]; then
  train "v2lite_${plain}layers" recipes/v2lite_shape.yaml data.shards="$OUT/c102k" model.num_hidden_layers="$plain"
fi

python3 - "$OUT" "${runs[@]}" <<'EOF'
import json, re, sys, statistics
out, runs = sys.argv[1], sys.argv[2:]
peak = re.compile(r"\[memory\] stage (\w+): peak allocated [^(]*\((\d+) bytes\), plan [^(]*\((\d+) bytes\), plan error ([^,\n]+)(.*)")
params = re.compile(r"\[memory\] plan per rank: (\S+) parameters")
print("\n| run | stage | parameters | plan GiB | measured GiB | plan error | tokens/s |")
print("|---|---|---:|---:|---:|---:|---:|")
for r in runs:
    try:
        log = open(f"{out}/{r}.log").read()
    except OSError:
        continue
    p = params.search(log)
    tps = {}
    try:
        for line in open(f"{out}/{r}/metrics.jsonl"):
            j = json.loads(line)
            if j.get("tokens_per_s"):
                tps.setdefault(j["stage"], []).append(j["tokens_per_s"])
    except OSError:
        pass
    for m in peak.finditer(log):
        stage, measured, planned, err = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        t = tps.get(stage, [])
        speed = f"{statistics.median(t[1:]) / 1e3:.1f}K" if len(t) > 1 else "-"
        print(f"| {r} | {stage} | {p.group(1) if p else '?'} | {planned / 2**30:.2f} | {measured / 2**30:.2f} | {err} | {speed} |")
EOF
echo "[memory_check] total $(( $(date +%s) - t0 )) s, status $status"
exit $status
