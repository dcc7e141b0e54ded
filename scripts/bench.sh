#!/usr/bin/env bash
# Runs the benchmarks on the default model (set-up first). Figures are printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
scripts/setup.sh
cargo bench --workspace "$@"
