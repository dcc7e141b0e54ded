#!/usr/bin/env bash
# Console chat on the default model (same set-up as serve.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh
scripts/setup.sh
cargo build --release --bin modelpool >&2
exec "$CARGO_TARGET_DIR/release/modelpool" chat "$@"
