# Shared settings for the scripts: one target directory and one model cache
# outside the checkout, so that llama.cpp (~10 min to build) is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/modelpool/target}"
export MODELPOOL_MODELS_DIR="${MODELPOOL_MODELS_DIR:-$HOME/.cache/modelpool/models}"
export MODELPOOL_TEST_MODEL="${MODELPOOL_TEST_MODEL:-$MODELPOOL_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}"
export MODELPOOL_TEST_SWA_MODEL="${MODELPOOL_TEST_SWA_MODEL:-$MODELPOOL_MODELS_DIR/gemma-3-270m-q4_k_m.gguf}"
export MODELPOOL_TEST_EMBED_MODEL="${MODELPOOL_TEST_EMBED_MODEL:-$MODELPOOL_MODELS_DIR/all-MiniLM-L6-v2.Q8_0.gguf}"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
