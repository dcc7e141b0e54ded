# Shared settings for the scripts: one target directory and one model cache
# outside the checkout, so that llama.cpp (~10 min to build) is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/modelpool/target}"
export MODELPOOL_MODELS_DIR="${MODELPOOL_MODELS_DIR:-$HOME/.cache/modelpool/models}"
export MODELPOOL_TEST_MODEL="${MODELPOOL_TEST_MODEL:-$MODELPOOL_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}"
export MODELPOOL_TEST_SWA_MODEL="${MODELPOOL_TEST_SWA_MODEL:-$MODELPOOL_MODELS_DIR/gemma-3-270m-q4_k_m.gguf}"
export MODELPOOL_TEST_EMBED_MODEL="${MODELPOOL_TEST_EMBED_MODEL:-$MODELPOOL_MODELS_DIR/all-MiniLM-L6-v2.Q8_0.gguf}"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
# llama.cpp for the CPU it runs on: its build (llama-cpp-sys-2) turns these
# into its own CMake options, so llama.cpp gets the AVX-512 kernels where the
# CPU has them (the Rust code stays generic x86-64). AMX is left off: VMs that
# report it may not allow it (llama-server dies with SIGILL there). For a
# binary to ship to other machines: MODELPOOL_PORTABLE=1 (AVX2, as upstream's
# default build). llama-cpp-sys-2 watches a GGML_ variable only if it was
# set at its last build, so LLAMA_BUILD_SHARED_LIBS (which it always
# watches) is set to its default, 0: a target directory built before these
# options existed is rebuilt with them once, and every change after is seen.
export LLAMA_BUILD_SHARED_LIBS="${LLAMA_BUILD_SHARED_LIBS:-0}"
# llama.cpp optimized as its own releases are (CMake's Release: -O3).
# llama-cpp-sys-2 would pick RelWithDebInfo (-O2) because the release profile
# keeps line tables for backtraces; measured at ~1,300 tokens of context, one
# sequence: the -O2 build decoded a token in 15.2 ms, llama-server's 10.5-11.7.
export LLAMA_LIB_PROFILE="${LLAMA_LIB_PROFILE:-Release}"
MODELPOOL_LLAMA_BUILD="generic x86-64 with AVX2"
[ "${MODELPOOL_PORTABLE:-0}" = 1 ] && MODELPOOL_LLAMA_BUILD="generic x86-64 with AVX2 (MODELPOOL_PORTABLE=1)"
if [ "${MODELPOOL_PORTABLE:-0}" != 1 ] && [ -r /proc/cpuinfo ] && grep -qw avx512f /proc/cpuinfo \
   && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo; then
  export GGML_AVX512=ON
  grep -qw avx512_vnni /proc/cpuinfo && export GGML_AVX512_VNNI=ON
  grep -qw avx512vbmi /proc/cpuinfo && export GGML_AVX512_VBMI=ON
  grep -qw avx512_bf16 /proc/cpuinfo && export GGML_AVX512_BF16=ON
  MODELPOOL_LLAMA_BUILD="this CPU: AVX-512$({ env | grep -o '^GGML_AVX512_[A-Z0-9]*' || true; } | sed 's/GGML_AVX512_/, /' | tr -d '\n') (MODELPOOL_PORTABLE=1: AVX2 only)"
fi

# llama-cpp-sys-2 configures llama.cpp's CMake build once per target
# directory unit and never again (its build does not re-run CMake's
# configure step), so a unit configured before these options, or with other
# ones, keeps its kernels whatever is asked now. Such a unit is removed here
# (its build output and its fingerprint, nothing else) and built again with
# the options asked: once, ~10 min on 2 cores.
for cache in "$CARGO_TARGET_DIR"/*/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt; do
  [ -f "$cache" ] || continue
  stale=""
  for opt in AVX512 AVX512_VNNI AVX512_VBMI AVX512_BF16; do
    have="$(sed -n "s/^GGML_${opt}:BOOL=//p" "$cache")"
    want="$(eval "echo \${GGML_${opt}:-OFF}")"
    [ -n "$have" ] && [ "$have" != "$want" ] && stale="$stale GGML_${opt}=$have (asked: $want)"
  done
  have="$(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$cache")"
  [ -n "$have" ] && [ "$have" != "$LLAMA_LIB_PROFILE" ] && stale="$stale CMAKE_BUILD_TYPE=$have (asked: $LLAMA_LIB_PROFILE)"
  if [ -n "$stale" ]; then
    unit="${cache%/out/build/CMakeCache.txt}"
    profile_dir="${unit%/build/*}"
    echo "[build] llama.cpp in $unit was configured with$stale; building it again for $MODELPOOL_LLAMA_BUILD (~10 min on 2 cores)" >&2
    rm -rf "$unit" "$profile_dir/.fingerprint/${unit##*/}"
  fi
done
