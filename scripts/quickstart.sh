#!/usr/bin/env bash
# Set-up, then the main job: the quickstart recipe (CPU when no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec build/bin/dsa-train recipes/quickstart.yaml "$@"
