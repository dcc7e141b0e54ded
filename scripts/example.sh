#!/usr/bin/env bash
# Builds and runs an example of the library (default: examples/embedded.rs) on
# the default models, sharing the one build of llama.cpp with the other scripts:
#   scripts/example.sh [NAME] [ARGS...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
scripts/setup.sh
name="${1:-embedded}"
[ $# -gt 0 ] && shift
echo "[example] building and running examples/$name.rs (first build compiles llama.cpp: ~10 min on 2 cores)" >&2
exec cargo run --release --example "$name" -- "$@"
