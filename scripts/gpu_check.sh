#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): build with CUDA, run the GPU tests and compute-sanitizer,
# a GPU training smoke run, the benchmarks (dsa-bench ops, kernels, train) and their PyTorch peers; the
# summary table prints last.
#
#   bash scripts/gpu_check.sh [all|tests|bench|long|wgmma|indexer|profile|build]   (results under $OUT, default /tmp/dsa_gpu)
#       long: the three stages at 32K, 64K and 128K (one sequence, recompute) and their table alone
#       wgmma: the wgmma sparse MLA kernels (docs/perf_log.md v12) in one call: their test and racecheck,
#              racecheck's own probes (tools/dsa_racecheck_probe.cu), an ncu summary of the backward, the
#              sparse attention ops, the kernel rows, the sparse step at 16K with DSA_SPARSE_ATTN_WGMMA
#              0 (mma.sync only), unset (the default: wgmma where measured faster) and 1 (every wgmma kernel)
#       indexer: the indexer's top-k in one call (docs/perf_log.md v13): the indexer / top-k tests, the
#              kernels and ops rows in both slot orders, the sparse step at 16K and 128K with --topk-order
#              index (the default) and score, a per-kernel Nsight Systems summary of one 128K sparse step
#              (when nsys is installed), an ncu summary of the 64-head scoring (when ncu is), racecheck of
#              the scoring test, racecheck and synccheck of the index-order test, the wgmma rate probe
#       profile: where the step's time goes (DSA_PROFILE=1, synchronized sections): dense and sparse at 16K,
#              sparse at 128K (one sequence, recompute), each section's ms and share, largest first
#   bash scripts/gpu_check.sh multi [tests|scale|ep|memory|resume ...]
#       a machine with several GPUs: scripts/gpu_check_multi.sh after the build (its table last)
# The GPU image has no PCRE2 -dev package: pcre2.h comes from .carry/pcre2 when present.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case $what in
  all | tests | bench | long | wgmma | indexer | profile | build | multi) ;;
  *) echo "[gpu_check] unknown mode '$what' (all|tests|bench|long|wgmma|indexer|profile|build|multi)" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/dsa_gpu}
mkdir -p "$OUT"
BUILD=${DSA_GPU_BUILD:-build-gpu}
pcre=()
[[ -f .carry/pcre2/pcre2.h ]] && pcre=(-DDSA_PCRE2_INCLUDE="$PWD/.carry/pcre2")
t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real "${pcre[@]}" \
  >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
ninja -C "$BUILD" >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
echo "[gpu_check] build $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

status=0
[[ $what == build ]] && exit 0
if [[ $what == multi ]]; then
  shift
  OUT=$OUT DSA_GPU_BUILD=$BUILD bash scripts/gpu_check_multi.sh "$@"
  exit $?
fi
if [[ $what == all || $what == tests ]]; then
  (cd "$BUILD" && ctest -L gpu --output-on-failure -j 4 >"$OUT/gpu_tests.log" 2>&1) || status=1
  grep -E "tests passed|tests failed|\*\*\*Failed|Failed  |Not Run" "$OUT/gpu_tests.log" | tail -15
  if command -v compute-sanitizer >/dev/null; then
    # The bench-small-shape tests stay out (slow under memcheck; their small siblings run the same code).
    bench_small='*HeadDims96x64:*Tokens2048Hidden1024Vocab129280:*Tokens4096Experts16Top4Widths1024And512'
    for t in test_gpu_basic test_gpu_moe test_gpu_attention test_gpu_dsa; do
      compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/bin/$t" --gtest_filter="-$bench_small" \
        >"$OUT/memcheck_$t.log" 2>&1
      rc=$?
      echo "[gpu_check] memcheck $t: rc $rc, $(grep -c 'Invalid\|out of bounds' "$OUT/memcheck_$t.log") errors, $(grep -E '\[  PASSED  \]' "$OUT/memcheck_$t.log")"
      [[ $rc == 0 ]] || status=1
    done
  fi
  if [[ -d deps/corpus/tiny ]]; then
    "$BUILD/bin/dsa-train" recipes/quickstart.yaml device=cuda output_dir="$OUT/qs" stages.dense.steps=60 \
      stages.warmup.steps=30 stages.sparse.steps=30 >"$OUT/quickstart_gpu.log" 2>&1 || status=1
    grep -E "^\[(dense|warmup|sparse|train)\]" "$OUT/quickstart_gpu.log" | grep -E "val|done|model" | tail -12
  fi
fi
if [[ $what == wgmma ]]; then
  "$BUILD/bin/test_gpu_dsa" --gtest_filter='*SparseAttention*' >"$OUT/wgmma_tests.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED) |Failure|rel err|vs CPU|vs mma" "$OUT/wgmma_tests.log" | head -30
  if command -v compute-sanitizer >/dev/null; then
    # SparseAttentionWgmma and SparseAttentionForwardWs run the ws forward (perf_log v24, v25); the third the
    # backward's split variant (DSA_SPARSE_ATTN_BWD_SPLIT=1, perf_log Next).
    for t in SparseAttentionWgmma SparseAttentionForwardWs SparseAttentionBackwardSplit; do
      timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 "$BUILD/bin/test_gpu_dsa" \
        --gtest_filter="*$t*" >"$OUT/racecheck_$t.log" 2>&1
      echo "[gpu_check] racecheck $t: rc $?, $(grep -E 'RACECHECK SUMMARY|hazard' "$OUT/racecheck_$t.log" | tail -1)"
      # Each reported pair of accesses once, with its source lines (the build has -lineinfo), most frequent first.
      # (racecheck prints the pair over two lines: "... between <access> ... in <file:line>" and "and <access> ...")
      awk '/Race reported/ {a = $0; getline b; print a " " b}' "$OUT/racecheck_$t.log" |
        sed -E 's/=+//g; s/.*between //; s/\+0x[0-9a-f]+//g; s/ at 0x[0-9a-f]+//g; s#/[^ ]*/##g; s/\([^)]*\)//g' |
        sort | uniq -c | sort -rn | head -8 | cut -c1-200
    done
    # Which hand-overs racecheck itself models (tools/dsa_racecheck_probe.cu): each probe is correct by the PTX
    # memory model, so a hazard reported on one is the tool's.
    probes="syncthreads bar_sync bar_sync_exit bar_sync_stay arrive_sync arrive_war mbar_elected mbar_all cp_async_mbar"
    for pr in $probes; do
      timeout 60 compute-sanitizer --tool racecheck "$BUILD/bin/dsa-racecheck-probe" $pr >"$OUT/probe_$pr.log" 2>&1
      rc=$?
      echo "[gpu_check] racecheck probe $pr: rc $rc, $(grep -E 'wrong values' "$OUT/probe_$pr.log" | sed 's/.*: //')," \
        "$(grep -E 'RACECHECK SUMMARY' "$OUT/probe_$pr.log" | sed 's/.*SUMMARY: //')"
    done
  fi
  # Where the sparse backward's cycles go (Nsight Compute, one launch at the kernel bench's shape): its raw
  # metrics, the throughputs, pipes and stall reasons, filtered.
  if command -v ncu >/dev/null; then
    # (the first launch: the default kernel; the bench's "(split)" row comes later)
    ops_sectors=lts__t_sectors_op_red.sum,lts__t_sectors_op_atom.sum,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum
    timeout 150 ncu --kernel-name regex:sparse_attn_bwd_wgmma --launch-count 1 --csv --page raw \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --metrics "$ops_sectors" \
      "$BUILD/bin/dsa-bench" kernels --only sparse >"$OUT/ncu_sparse_bwd.csv" 2>&1
    echo "[gpu_check] ncu sparse bwd: rc $?"
    keep='gpu__time_duration.sum|sm__throughput.avg.pct|l1tex__throughput.avg.pct|lts__throughput.avg.pct'
    keep+='|dram__throughput.avg.pct|issue_active.avg.pct|pipe_tensor.*pct|pipe_(alu|fma|fp64|lsu|xu).*pct'
    keep+='|issue_stalled_.*per_warp_active.pct|lts__t_sectors_op|l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum'
    keep+='|l1tex__data_pipe_lsu_wavefronts_mem_shared.sum'
    python3 tools/ncu_raw_filter.py "$OUT/ncu_sparse_bwd.csv" "$keep" | head -48
  fi
  "$BUILD/bin/dsa-bench" ops --only sparse_attention 2>&1 | grep -E "sparse_attention" | head -24
  "$BUILD/bin/dsa-bench" kernels 2>&1 | grep -E "sparse MLA"
  for wg in 0 "" 1; do
    echo "[gpu_check] DSA_SPARSE_ATTN_WGMMA=${wg:-unset}"
    DSA_SPARSE_ATTN_WGMMA=$wg "$BUILD/bin/dsa-bench" train --seq-len 16384 --stages sparse 2>&1 | tail -2
  done
fi
if [[ $what == indexer ]]; then
  # Each step under a timeout: a kernel that hangs costs its step, not the call.
  timeout 180 "$BUILD/bin/test_gpu_dsa" --gtest_filter='*Indexer*:*Topk*' >"$OUT/indexer_tests.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED) |Failure|\[topk\]" "$OUT/indexer_tests.log" | head -40
  # What the tensor cores sustain for the scoring's wgmma pattern alone (docs/perf_log.md v18).
  [[ -x "$BUILD/bin/dsa-wgmma-rate" ]] && timeout 90 "$BUILD/bin/dsa-wgmma-rate" 2>&1 | tee "$OUT/wgmma_rate.log"
  timeout 150 "$BUILD/bin/dsa-bench" kernels 2>&1 | grep -E "indexer|FP8 GEMM"
  timeout 90 "$BUILD/bin/dsa-bench" ops --only indexer 2>&1 | grep -E "indexer_topk fp8"
  for order in index score; do
    echo "[gpu_check] --topk-order $order"
    timeout 60 "$BUILD/bin/dsa-bench" train --seq-len 16384 --stages sparse --topk-order $order 2>&1 | tail -1
    timeout 90 "$BUILD/bin/dsa-bench" train --seq-len 131072 --tokens 131072 --recompute --steps 2 --warmup 1 \
      --stages sparse --topk-order $order 2>&1 | tail -1
  done
  # Where the 64-head scoring's cycles go (Nsight Compute, when the image has it; docs/perf_log.md v17's next
  # step): one launch at T = 8192, its speed of light, pipes, warp states and scheduler, as CSV.
  if command -v ncu >/dev/null; then
    timeout 150 ncu --kernel-name regex:score_wgmma4 --launch-count 1 --csv --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section SchedulerStats "$BUILD/bin/dsa-bench" kernels --only indexer >"$OUT/ncu_scoring.csv" 2>&1
    echo "[gpu_check] ncu scoring: rc $?, $(grep -c , "$OUT/ncu_scoring.csv") rows in $OUT/ncu_scoring.csv"
    grep -E '"(Duration|Elapsed Cycles|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction)"' \
      "$OUT/ncu_scoring.csv" | awk -F'","' '{print "[ncu] " $(NF-2) ": " $NF " " $(NF-1)}' | tr -d '"' | head -12
  fi
  # Where the 128K sparse step's time goes, per kernel (Nsight Systems, when the image has it).
  if command -v nsys >/dev/null; then
    timeout 120 nsys profile -o "$OUT/sparse128k" --force-overwrite true "$BUILD/bin/dsa-bench" train \
      --seq-len 131072 --tokens 131072 --recompute --steps 1 --warmup 0 --stages sparse >"$OUT/nsys.log" 2>&1
    nsys stats --report cuda_gpu_kern_sum --format csv "$OUT/sparse128k.nsys-rep" 2>/dev/null |
      python3 -c "import csv,sys; r=[x for x in csv.DictReader(l for l in sys.stdin if ',' in l)]; [print(f\"{float(x['Time (%)']):5.1f}% {float(x['Total Time (ns)'])/1e6:9.1f} ms {x['Instances']:>6} {x['Name'][:90]}\") for x in r[:14]]" ||
      echo "[gpu_check] nsys stats: no kernel summary (see $OUT/nsys.log)"
  fi
  if command -v compute-sanitizer >/dev/null; then
    timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 "$BUILD/bin/test_gpu_dsa" \
      --gtest_filter='*IndexerTopkFp8*' >"$OUT/scoring_racecheck.log" 2>&1
    echo "[gpu_check] racecheck IndexerTopkFp8: rc $?, $(grep -E 'SUMMARY' "$OUT/scoring_racecheck.log" | tail -1)"
    for tool in racecheck synccheck; do
      timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 "$BUILD/bin/test_gpu_dsa" \
        --gtest_filter='*TopkIndexOrder*' >"$OUT/indexer_$tool.log" 2>&1
      echo "[gpu_check] $tool TopkIndexOrder: rc $?, $(grep -E 'SUMMARY' "$OUT/indexer_$tool.log" | tail -1)"
    done
  fi
fi
if [[ $what == profile ]]; then
  DSA_PROFILE=1 timeout 150 "$BUILD/bin/dsa-bench" train --seq-len 16384 --stages dense,sparse 2>&1 |
    grep -v "^\[bench\]"
  DSA_PROFILE=1 timeout 200 "$BUILD/bin/dsa-bench" train --seq-len 131072 --tokens 131072 --recompute --steps 1 \
    --warmup 1 --stages sparse 2>&1 | grep -v "^\[bench\]"
fi
if [[ $what == all || $what == bench ]]; then
  rm -f "$OUT/bench.jsonl"
  # DSA_BENCH_OPS=0 leaves out the per-op figures, DSA_PEERS_SEQ_LENS=16384 runs the peers at 16K alone (a call
  # that must fit the table in its time).
  if [[ ${DSA_BENCH_OPS:-1} != 0 ]]; then
    "$BUILD/bin/dsa-bench" ops --json "$OUT/bench.jsonl" >"$OUT/ops.log" 2>&1 || status=1
    echo "[gpu_check] dsa-bench ops: $(grep -c ' ms' "$OUT/ops.log") figures in $OUT/ops.log; $(tail -1 "$OUT/ops.log")"
  fi
  "$BUILD/bin/dsa-bench" kernels --json "$OUT/bench.jsonl" 2>&1 | tail -24
  "$BUILD/bin/dsa-bench" train --seq-len 4096,16384 --json "$OUT/bench.jsonl" 2>&1 | tail -10
  "$BUILD/bin/dsa-bench" train --seq-len 32768 --tokens 32768 --json "$OUT/bench.jsonl" 2>&1 | tail -4
  PYTHONUNBUFFERED=1 timeout "${DSA_PEERS_TIMEOUT:-900}" python3 tools/bench_peers.py --json "$OUT/bench.jsonl" \
    --seq-lens "${DSA_PEERS_SEQ_LENS:-4096,16384,32768}" \
    >"$OUT/peers.log" 2>&1 || status=1
  tail -3 "$OUT/peers.log"
fi
if [[ $what == all || $what == bench || $what == long ]]; then
  [[ $what == long ]] && rm -f "$OUT/bench.jsonl"
  # One sequence per step with recompute, 2 steps after 1 warm-up (the 128K warm-up step is the longest).
  if [[ ${DSA_BENCH_LONG:-1} != 0 ]]; then
    "$BUILD/bin/dsa-bench" train --seq-len 32768,65536,131072 --tokens 32768 --recompute --steps 2 --warmup 1 \
      --json "$OUT/bench.jsonl" 2>&1 | tail -10
  fi
  python3 tools/bench_table.py "$OUT/bench.jsonl" | tee "$OUT/table.md"
fi
echo "[gpu_check] total $(( $(date +%s) - t0 )) s, status $status"
exit $status
