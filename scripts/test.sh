#!/usr/bin/env bash
# Set-up, then the whole test suite (GPU-labelled tests skip themselves without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd "${DSA_BUILD_DIR:-build}"
ctest --output-on-failure -j "${DSA_JOBS:-$(nproc)}" "$@"
