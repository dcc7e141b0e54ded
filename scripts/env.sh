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
# default build). LLAMA_LIB_PROFILE (the default, Release) is set so that a
# target directory built before these options existed is rebuilt with them.
export LLAMA_LIB_PROFILE="${LLAMA_LIB_PROFILE:-Release}"
if [ "${MODELPOOL_PORTABLE:-0}" != 1 ] && [ -r /proc/cpuinfo ] && grep -qw avx512f /proc/cpuinfo \
   && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo; then
  export GGML_AVX512=ON
  grep -qw avx512_vnni /proc/cpuinfo && export GGML_AVX512_VNNI=ON
  grep -qw avx512vbmi /proc/cpuinfo && export GGML_AVX512_VBMI=ON
  grep -qw avx512_bf16 /proc/cpuinfo && export GGML_AVX512_BF16=ON
fi
