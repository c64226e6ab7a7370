#!/usr/bin/env bash
# The exports of every golden set, for the export -> transformers check (tests/model/test_hf_golden.cpp,
# HfGoldenExport): each tests/golden/<set>/model is imported by dsa-convert (an indexer of 3 heads x 8,
# top-5 where the set has none) and exported to tests/golden/<set>/export/f32 (--dtype f32) and
# export/bf16 (the default). `python3 tools/hf_reference.py --check-exports tests/golden --out DIR` then
# loads each export with transformers (the class its config.json names) and records its logits.
#
#   bash scripts/golden_exports.sh [BUILD_DIR]      (default build-cpu, else build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-}
if [[ -z "$build" ]]; then build=build-cpu; [[ -x $build/bin/dsa-convert ]] || build=build; fi
convert=$build/bin/dsa-convert
[[ -x $convert ]] || { echo "no $convert: build first" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for dir in tests/golden/*; do
  set=$(basename "$dir")
  [[ -f $dir/manifest.json && -d $dir/model ]] || continue
  flags=()
  grep -q '"index_n_heads"' "$dir/model/config.json" || flags=(--index-n-heads 3 --index-head-dim 8 --index-topk 5)
  "$convert" import "$dir/model" "$tmp/$set.h5" "${flags[@]}" > /dev/null
  for dt in f32 bf16; do
    rm -rf "$dir/export/$dt/"*.safetensors "$dir/export/$dt/"*.json
    "$convert" export "$tmp/$set.h5" "$dir/export/$dt" --dtype "$dt" | sed "s|^|[$set $dt] |"
  done
done
