#!/usr/bin/env bash
# Runs the benchmarks on the default model (set-up first). Figures are printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
# The side-by-side benchmarks (versus, rotation) run llama.cpp's own llama-server (built once);
# the replica benchmark runs HAProxy and a throwaway PostgreSQL cluster.
scripts/setup.sh --with-llama-server --with-test-tools
MODELPOOL_LLAMA_SERVER="$(scripts/setup.sh --llama-server-path)"
export MODELPOOL_LLAMA_SERVER
echo "[bench] running the benchmarks (llama.cpp for $MODELPOOL_LLAMA_BUILD); figures are printed as each finishes" >&2
cargo bench --workspace "$@"
