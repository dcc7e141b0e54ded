#!/usr/bin/env bash
# Runs the HTTP server on the default model: set-up first (system packages,
# models), then `modelpool serve` with any extra arguments, e.g.
#   scripts/serve.sh --profile small --bind 0.0.0.0:8080
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
scripts/setup.sh
echo "[serve] building modelpool (first build compiles llama.cpp: ~10 min on 2 cores; llama.cpp for $MODELPOOL_LLAMA_BUILD)" >&2
cargo build --release --bin modelpool
exec "$CARGO_TARGET_DIR/release/modelpool" serve "$@"
