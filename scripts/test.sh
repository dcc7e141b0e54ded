#!/usr/bin/env bash
# Runs the whole test suite on the real models: set-up first (system packages,
# models, llama.cpp's llama-server for the remote-instance tests), then every test of the workspace in the release profile (the same
# build of llama.cpp as `serve`, so it is compiled once).
#   scripts/test.sh                     the whole suite, then the container image test
#   scripts/test.sh CARGO TEST ARGS     part of the suite (e.g. --test http_api), no container test
#   scripts/test.sh --container         only the container image test
#                     (tests/container.sh): builds the release binary, then the
#                     Containerfile's runtime stage around it with podman, and
#                     runs it until /health answers and one chat turn succeeds
#                     (~1.5 min on a cold cache, as root). MODELPOOL_TEST_BINARY=PATH
#                     tests that binary instead of building one.
#   scripts/test.sh --with-container CARGO TEST ARGS
#                     part of the suite, then the container test. The closing
#                     Total line counts the container test as one test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
mode=suite
[ $# -eq 0 ] && mode=both
case "${1:-}" in
  --container) mode=container; shift
    [ $# -eq 0 ] || { echo "[test] error: --container takes no other arguments (got: $*)" >&2; exit 2; } ;;
  --with-container) mode=both; shift ;;
esac

# The container image test around the release binary; prints its own
# [container] lines, returns its status.
container_test() {
  local binary="${MODELPOOL_TEST_BINARY:-}"
  if [ -z "$binary" ]; then
    echo "[test] building the release binary for the container image (cargo build --release --bin modelpool)" >&2
    cargo build --release --bin modelpool || return 1
    binary="$CARGO_TARGET_DIR/release/modelpool"
  else
    echo "[test] container image test around MODELPOOL_TEST_BINARY=$binary (no build)" >&2
  fi
  tests/container.sh "$binary"
}

if [ "$mode" = container ]; then
  # podman and debootstrap come with the test tools; the models with any set-up.
  scripts/setup.sh --with-test-tools
  set +e
  container_test
  status=$?
  set -e
  [ "$status" = 0 ] && echo "Total: 1 passed, 0 failed (the container image test)" || echo "Total: 0 passed, 1 failed (the container image test)"
  exit "$status"
fi

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
container="none"
if [ "$mode" = both ]; then
  container_test
  container_status=$?
  if [ "$container_status" = 0 ]; then container=passed; else container=failed; [ "$status" = 0 ] && status=$container_status; fi
fi
set -e
# One closing line for the whole suite, summed over every test binary (and,
# with --with-container, the container image test as one more).
# A test target that does not compile runs nothing: the line says so.
awk -v container="$container" '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     /^error: could not compile/ { broken++ }
     END { if (container == "passed") p++; if (container == "failed") f++
           printf "Total: %d passed, %d failed%s%s\n", p, f, container == "none" ? "" : " (the container image test " container ")",
                  broken ? sprintf("; %d build error(s): the tests of a target that did not compile did not run", broken) : "" }' "$log"
exit "$status"
