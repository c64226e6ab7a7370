#!/usr/bin/env bash
# Multi-GPU measurements (one host, NCCL, NVLink multicast off), run by `bash scripts/gpu_check.sh multi
# [PART...]` after its build; the table of every row measured on this machine prints last.
#
#   tests    the GPU suite with its multi-GPU tests running (data parallel, expert parallel, ZeRO-1/2 on
#            two GPUs, a killed rank ending the job)
#   scale    bench-small at 16K, dense and sparse stages, on 1, 2, 4, .. N GPUs (one 16K sequence per GPU
#            and step): tokens/s and efficiency tok/s(n) / (n tok/s(1)), gradient reduction overlapped
#            with the backward and not (parallelism.overlap=false) on every n > 1
#   ep       bench-small with 64 routed experts on N GPUs at ep = 1 and ep = N: per-GPU peak and tokens/s
#   memory   the V2-Lite/Moonlight shape family (recipes/v2lite_shape.yaml) at 16K on N GPUs: the full
#            16B model in the layout the memory plan chooses, or the largest member that fits when none
#            does; trained a few steps per stage: per-GPU peak (rank 0) against the plan
#   resume   a checkpoint written on N GPUs (ep = N, ZeRO-2) resumed on 1 GPU and on N/2 GPUs (after
#            dsa-convert reshard), against the uninterrupted N-GPU run's held-out loss at the same step
#
# Default: every part. Rows go to $WORK/rows.jsonl (runs/multi_gpu: it survives the calls on one warm
# machine, so the parts can run one call each); the table reads all of them and is copied to $OUT.
# Training runs read uniformly random tokens (`dsa-prep random`): speed and memory do not depend on them.
#
# DSA_GPUS=N uses N GPUs (default: all). DSA_MULTI_CPU=1 runs every part on the CPU backend with
# mpirun -np 2 and the quickstart model at 128 tokens: a check of this script on a machine without GPUs,
# not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${DSA_GPU_BUILD:-build-gpu}
OUT=${OUT:-/tmp/dsa_gpu}
WORK=${DSA_MULTI_WORK:-runs/multi_gpu}
mkdir -p "$OUT" "$WORK"
WORK=$(cd "$WORK" && pwd)   # absolute: the tests part runs ctest from the build directory
ROWS=$WORK/rows.jsonl
CPU=${DSA_MULTI_CPU:-0}
parts=("$@")
(( ${#parts[@]} )) || parts=(tests scale ep memory resume)
status=0
say() { echo "[multi_gpu] $*"; }

if [[ $CPU == 1 ]]; then
  BUILD=${DSA_BUILD_DIR:-build}
  N=2
  DEVICE=cpu
  RECIPE=recipes/quickstart.yaml
  SEQ=128
  SIZE=(model.max_position_embeddings=1024)
  MEMORY_RECIPE=recipes/quickstart.yaml
  MEMORY_ARGS=(--device-memory 320MiB)
  VOCAB=129280
  MEM_VOCAB=129280
  EP_EXPERTS=8
else
  N=${DSA_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
  DEVICE=cuda
  RECIPE=recipes/bench_small.yaml
  SEQ=16384
  SIZE=()
  MEMORY_RECIPE=recipes/v2lite_shape.yaml
  MEMORY_ARGS=()
  VOCAB=129280
  MEM_VOCAB=102400
  EP_EXPERTS=64
fi
(( N >= 1 )) || { say "no GPU found"; exit 1; }
say "$N ${DEVICE} ranks; parts: ${parts[*]}"

# The random corpora: enough tokens that no rank's stream wraps within a run.
[[ -f $WORK/c$VOCAB/corpus.json ]] ||
  "$BUILD/bin/dsa-prep" random --out "$WORK/c$VOCAB" --vocab $VOCAB --docs 256 --doc-tokens 20000 >/dev/null || exit 1
[[ -f $WORK/c$MEM_VOCAB/corpus.json ]] ||
  "$BUILD/bin/dsa-prep" random --out "$WORK/c$MEM_VOCAB" --vocab $MEM_VOCAB --docs 64 --doc-tokens 20000 >/dev/null ||
  exit 1

# dsa-train on NP ranks: train NAME NP RECIPE overrides... (log $WORK/NAME.log, output $WORK/NAME)
train() {
  local name=$1 np=$2 recipe=$3
  shift 3
  local launch=()
  (( np > 1 )) && launch=(mpirun -np "$np" --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE=0
                          -x OMP_NUM_THREADS=$([[ $CPU == 1 ]] && echo 1 || echo 4))
  rm -rf "${WORK:?}/$name"
  local t=$(date +%s)
  "${launch[@]}" "$BUILD/bin/dsa-train" "$recipe" device=$DEVICE output_dir="$WORK/$name" "${SIZE[@]}" "$@" \
    >"$WORK/$name.log" 2>&1
  local rc=$?
  say "$name ($np ranks): rc $rc, $(( $(date +%s) - t )) s"
  if (( rc != 0 )); then status=1; grep -v "^\[\(dense\|warmup\|sparse\)\] step" "$WORK/$name.log" | tail -6; fi
  return $rc
}

# row PART NAME GPUS LAYOUT [STAGES]: one row per stage of run NAME (STAGES: a comma list, default all) (median tokens/s over its log windows after
# the first, rank 0's peak and the plan), appended to rows.jsonl.
row() {
  python3 - "$WORK" "$@" >>"$ROWS" <<'EOF'
import json, re, statistics, sys
work, part, name, gpus, layout = sys.argv[1:6]
only = set(sys.argv[6].split(",")) if len(sys.argv) > 6 else None
log = open(f"{work}/{name}.log").read()
peak = {m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"\[memory\] stage (\w+): peak allocated [^(]*\((\d+) bytes\), plan [^(]*\((\d+) bytes\)", log)}
tps = {}
try:
    for line in open(f"{work}/{name}/metrics.jsonl"):
        j = json.loads(line)
        if j.get("tokens_per_s"):
            tps.setdefault(j["stage"], []).append(j["tokens_per_s"])
except OSError:
    pass
params = re.search(r"\[memory\] plan per rank: (\S+) parameters", log)
for stage in sorted(set(peak) | set(tps), key=lambda s: ["dense", "warmup", "sparse"].index(s) if s in ("dense", "warmup", "sparse") else 9):
    if only and stage not in only:
        continue
    t = tps.get(stage, [])
    measured, planned = peak.get(stage, (None, None))
    print(json.dumps({"part": part, "run": name, "gpus": int(gpus), "layout": layout, "stage": stage,
                      "tok_s": statistics.median(t[1:]) if len(t) > 1 else (t[0] if t else None),
                      "peak": measured, "plan": planned, "parameters": params.group(1) if params else None}))
EOF
}

note() {  # note PART TEXT: a free row (test results, resume figures)
  python3 -c 'import json, sys; print(json.dumps({"part": sys.argv[1], "note": sys.argv[2]}))' "$1" "$2" >>"$ROWS"
}

# Throughput runs: dense and sparse stages (a 2-step warm-up between them), no evaluation, no checkpoint.
speed_args() {  # speed_args GLOBAL_BATCH
  echo "stage_defaults.seq_len=$SEQ stage_defaults.global_batch=$1 stage_defaults.eval_interval=0" \
       "stage_defaults.eval_batches=0 checkpointing.save=false logging.log_interval=4" \
       "stages.dense.steps=16 stages.dense.warmup_steps=2 stages.warmup.steps=2 stages.warmup.warmup_steps=1" \
       "stages.sparse.steps=16 stages.sparse.warmup_steps=2 data.keep_documents_contiguous=false"
}

part_tests() {
  local sel=(-L gpu -j 4)
  [[ $CPU == 1 ]] && sel=(-R Dist -j 2)
  (cd "$BUILD" && ctest "${sel[@]}" >"$WORK/tests.log" 2>&1) || status=1
  local summary; summary=$(grep -E "tests passed" "$WORK/tests.log" | tail -1)
  grep -E "tests passed|\*\*\*Failed|Failed  |Not Run" "$WORK/tests.log" | tail -12
  # The multi-GPU tests print their figures; a skip would mean they did not run.
  local gtests=(test_gpu_dist test_gpu_zero)
  [[ $CPU == 1 ]] && gtests=(test_dist_sharded)
  for t in "${gtests[@]}"; do
    "$BUILD/bin/$t" >"$WORK/$t.log" 2>&1 || status=1
    grep -E "^\[(gpu dist|gpu zero|dist sharded)\]|SKIPPED|FAILED  \]|PASSED  \]" "$WORK/$t.log" | head -20
    note tests "$t: $(grep -E '^\[  PASSED  \]' "$WORK/$t.log" | sed 's/\[  PASSED  \] //'), $(grep -c '^\[  SKIPPED \]' "$WORK/$t.log") skipped, $(grep -c '^\[  FAILED  \]' "$WORK/$t.log") failed"
  done
  note tests "ctest: ${summary:-no summary}"
}

part_scale() {
  local data=data.shards=$WORK/c$VOCAB n
  train scale_1 1 "$RECIPE" $data $(speed_args 1) && row scale scale_1 1 "dp1" dense,sparse
  for (( n = 2; n <= N; n *= 2 )); do
    train "scale_$n" "$n" "$RECIPE" $data $(speed_args "$n") && row scale "scale_$n" "$n" "dp$n overlap" dense,sparse
    train "scale_${n}_no_overlap" "$n" "$RECIPE" $data $(speed_args "$n") parallelism.overlap=false &&
      row scale "scale_${n}_no_overlap" "$n" "dp$n no overlap" dense,sparse
  done
  if (( N > 2 && (N & (N - 1)) != 0 )); then  # N not a power of two: measure N itself too
    train "scale_$N" "$N" "$RECIPE" $data $(speed_args "$N") && row scale "scale_$N" "$N" "dp$N overlap" dense,sparse
  fi
}

part_ep() {
  (( N > 1 )) || { say "ep: needs 2 GPUs"; return; }
  local data=data.shards=$WORK/c$VOCAB experts=model.n_routed_experts=$EP_EXPERTS
  train ep_1 "$N" "$RECIPE" $data $experts $(speed_args "$N") parallelism.ep=1 &&
    row ep ep_1 "$N" "$EP_EXPERTS experts, dp$N ep1" dense,sparse
  train "ep_$N" "$N" "$RECIPE" $data $experts $(speed_args "$N") parallelism.ep="$N" &&
    row ep "ep_$N" "$N" "$EP_EXPERTS experts, dp$N ep$N" dense,sparse
}

part_memory() {
  local plan=$WORK/memory_plan.log layout=() rc_flag
  "$BUILD/bin/dsa-train" "$MEMORY_RECIPE" stage_defaults.global_batch="$N" --dry-run --ranks "$N" "${MEMORY_ARGS[@]}" \
    --choose-layout >"$plan" 2>&1
  grep -E "plan per rank|layout for|no layout" "$plan"
  local line; line=$(grep -E "the plan's layout for" "$plan" | head -1)
  local layers=""
  if [[ -n $line ]]; then
    read -r -a layout <<<"$(echo "$line" | sed 's/.*ranks: //')"
  else
    # None fits: the most sharded layout (experts over every GPU, ZeRO-2, recompute) and the largest member.
    layout=(parallelism.ep="$N" parallelism.zero=2 stage_defaults.recompute=true)
    "$BUILD/bin/dsa-train" "$MEMORY_RECIPE" stage_defaults.global_batch="$N" "${layout[@]}" --dry-run --ranks "$N" \
      "${MEMORY_ARGS[@]}" --fit-layers >"$WORK/memory_fit.log" 2>&1
    layers=$(sed -n 's/.*largest fitting with recompute: model.num_hidden_layers=\([0-9]*\).*/\1/p' "$WORK/memory_fit.log")
    [[ -n $layers && $layers -gt 0 ]] || { say "memory: nothing fits"; status=1; return; }
    layout+=(model.num_hidden_layers="$layers")
  fi
  say "memory: ${layout[*]}"
  local cap=()
  [[ $CPU == 1 ]] || cap=(stage_defaults.seq_len=16384)
  train memory "$N" "$MEMORY_RECIPE" data.shards="$WORK/c$MEM_VOCAB" stage_defaults.global_batch="$N" "${cap[@]}" \
    "${layout[@]}" checkpointing.save=false stage_defaults.eval_batches=0 stage_defaults.eval_interval=0 \
    logging.log_interval=1 stages.dense.steps=4 stages.dense.warmup_steps=1 stages.warmup.steps=3 \
    stages.warmup.warmup_steps=1 stages.sparse.steps=4 stages.sparse.warmup_steps=1 &&
    row memory memory "$N" "${layout[*]}"
}

val_loss() {  # the last held-out loss in a metrics.jsonl
  python3 -c "import json, sys; v = [json.loads(l)['val_lm_loss'] for l in open(sys.argv[1]) if 'val_lm_loss' in l]; print(f'{v[-1]:.6f}' if v else '?')" "$1" 2>/dev/null || echo "?"
}

part_resume() {
  (( N > 1 )) || { say "resume: needs 2 GPUs"; return; }
  local half=$(( N / 2 )) data=data.shards=$WORK/c$VOCAB
  local seq=$([[ $CPU == 1 ]] && echo 128 || echo 4096)
  local args=(stage_defaults.seq_len=$seq stage_defaults.global_batch=$N stage_defaults.eval_interval=0
              stage_defaults.eval_batches=2 stages.dense.steps=8 stages.dense.warmup_steps=2 logging.log_interval=1
              data.keep_documents_contiguous=false --stage dense)
  local sharded=(parallelism.ep="$N" parallelism.zero=2)
  # EP must divide the experts: bench-small has 16, the quickstart 8.
  train resume_ref "$N" "$RECIPE" $data "${args[@]}" "${sharded[@]}" || return
  train resume_write "$N" "$RECIPE" $data "${args[@]}" "${sharded[@]}" --max-steps 4 || return
  local ckpt; ckpt=$(cat "$WORK/resume_write/checkpoints/latest" 2>/dev/null)
  ckpt=$WORK/resume_write/checkpoints/$ckpt
  local targets=(1)
  (( half > 1 )) && targets+=("$half")
  for k in "${targets[@]}"; do
    "$BUILD/bin/dsa-convert" reshard "$ckpt" "$WORK/resume_to_$k/checkpoints" --ranks "$k" >"$WORK/reshard_$k.log" 2>&1 ||
      { say "reshard to $k failed"; tail -3 "$WORK/reshard_$k.log"; status=1; continue; }
    local lay=(parallelism.ep=1 parallelism.zero=0)
    (( k > 1 )) && lay=(parallelism.ep="$k" parallelism.zero=2)
    local launch=()
    (( k > 1 )) && launch=(mpirun -np "$k" --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE=0)
    "${launch[@]}" "$BUILD/bin/dsa-train" "$RECIPE" device=$DEVICE output_dir="$WORK/resume_to_$k" "${SIZE[@]}" $data \
      "${args[@]}" "${lay[@]}" checkpointing.dir="$WORK/resume_to_$k/checkpoints" --resume >"$WORK/resume_to_$k.log" 2>&1 ||
      { say "resume on $k failed"; tail -5 "$WORK/resume_to_$k.log"; status=1; continue; }
    # The resumed run's step-8 parameters against the uninterrupted run's: the largest relative l2
    # difference over the parameters (dsa-inspect --diff), and the held-out loss of both.
    local a b d
    a=$(val_loss "$WORK/resume_ref/metrics.jsonl")
    b=$(val_loss "$WORK/resume_to_$k/metrics.jsonl")
    d=$("$BUILD/bin/dsa-inspect" --diff "$WORK/resume_ref/checkpoints/dense/final" "$WORK/resume_to_$k/checkpoints/dense/final" |
        python3 -c "import re, sys; v = [float(m.group(2)) for m in (re.match(r'(\S+) .*rel l2 (\S+)', l) for l in sys.stdin) if m and not m.group(1).startswith('optim/')]; print(f'{max(v):.2e}' if v else '?')")
    say "resume: written on $N ranks at step 4, resumed on $k: val loss at step 8 $b (uninterrupted $a), parameters within $d (relative l2)"
    note resume "written on $N ranks (${sharded[*]}) at step 4, resharded and resumed on $k (${lay[*]}): step 8 val loss ${b:-?} vs ${a:-?} uninterrupted, parameters within ${d:-?} (largest relative l2 difference)"
  done
}

for p in "${parts[@]}"; do
  case $p in
    tests|scale|ep|memory|resume) say "--- $p"; "part_$p" ;;
    *) say "unknown part '$p' (tests, scale, ep, memory, resume)"; exit 2 ;;
  esac
done

# The table: every row of this machine, the efficiency against the 1-GPU row of the same stage.
python3 - "$ROWS" <<'EOF' | tee "$OUT/multi_gpu_table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = {r["stage"]: r["tok_s"] for r in rows if r.get("part") == "scale" and r.get("gpus") == 1 and r.get("tok_s")}
gib = lambda b: f"{b / 2**30:.1f}" if b else "-"
print("\n| part | GPUs | layout | stage | tok/s | efficiency | peak GiB/GPU | plan GiB | plan error |")
print("|---|---:|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    if "note" in r:
        continue
    t = r.get("tok_s")
    if r["part"] == "memory" and r.get("parameters"):
        r["layout"] += f" ({r['parameters']} parameters)"
    eff = "-"
    if r["part"] == "scale" and t and base.get(r["stage"]):
        eff = f"{100 * t / (r['gpus'] * base[r['stage']]):.1f}%"
    err = f"{100 * (r['plan'] - r['peak']) / r['peak']:+.1f}%" if r.get("peak") and r.get("plan") else "-"
    print(f"| {r['part']} | {r['gpus']} | {r['layout']} | {r['stage']} | {t / 1e3:.{1 if t >= 1e4 else 3}f}K |" if t else
          f"| {r['part']} | {r['gpus']} | {r['layout']} | {r['stage']} | - |", end="")
    print(f" {eff} | {gib(r.get('peak'))} | {gib(r.get('plan'))} | {err} |")
notes = [r for r in rows if "note" in r]
if notes:
    print()
    for r in notes:
        print(f"- {r['part']}: {r['note']}")
EOF
say "status $status"
exit $status
