#!/usr/bin/env bash
# Runs the whole test suite on the real models: set-up first (system packages,
# models), then every test of the workspace in the release profile (the same
# build of llama.cpp as `serve`, so it is compiled once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
scripts/setup.sh
echo "[test] building and running the tests (first build compiles llama.cpp: ~10 min on 2 cores)" >&2
cargo test --release --workspace "$@"
