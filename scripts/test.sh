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
