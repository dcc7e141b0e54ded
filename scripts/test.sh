#!/usr/bin/env bash
# Runs the whole test suite on the real models: set-up first (system packages,
# models, llama.cpp's llama-server for the remote-instance tests), then every test of the workspace in the release profile (the same
# build of llama.cpp as `serve`, so it is compiled once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
# The remote-instance tests run real llama-server processes: built once
# into the cache (~13 min on 2 cores the first time), then only checked. The
# web page tests drive Chromium, the console test runs under tmux, the
# replica test behind HAProxy, the shared-store tests on throwaway PostgreSQL clusters.
scripts/setup.sh --with-llama-server --with-test-tools
MODELPOOL_LLAMA_SERVER="$(scripts/setup.sh --llama-server-path)"
export MODELPOOL_LLAMA_SERVER
echo "[test] building and running the tests (first build compiles llama.cpp: ~10 min on 2 cores; llama.cpp for $MODELPOOL_LLAMA_BUILD)" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "Total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
