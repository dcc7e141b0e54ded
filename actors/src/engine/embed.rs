//! Sentence embeddings with a llama.cpp encoder model (all-MiniLM-L6-v2 in
//! GGUF): mean pooling, L2-normalised. Not thread-safe: one per thread.

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

use super::llama::{backend, load_model};
use crate::error::EngineError;

/// Longest input in tokens; BERT needs the whole input in one micro-batch,
/// so longer text is truncated (explicitly, here) to this many tokens.
pub const MAX_EMBED_TOKENS: usize = 512;

/// An embedding model with its own context.
pub struct LlamaEmbedder {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    dim: usize,
}

impl LlamaEmbedder {
    pub fn load(path: &Path, threads: u32) -> Result<Self, EngineError> {
        let model: &'static LlamaModel = Box::leak(Box::new(load_model(path)?));
        let n_ctx = (model.n_ctx_train() as usize).clamp(16, MAX_EMBED_TOKENS) as u32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads.max(1) as i32)
            .with_n_threads_batch(threads.max(1) as i32)
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::Mean);
        let ctx = model.new_context(backend()?, params).map_err(|e| EngineError::Context(e.to_string()))?;
        let dim = model.n_embd() as usize;
        Ok(Self { model, ctx, dim })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds one text; the result has unit length.
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, EngineError> {
        let vocab = self.model.vocab();
        let limit = (self.ctx.n_ubatch() as usize).min(MAX_EMBED_TOKENS);
        let mut tokens = vocab.tokenize(text.as_bytes(), true, false);
        if tokens.len() > limit {
            // Keep the closing [SEP] the model was trained with.
            let last = *tokens.last().expect("non-empty");
            tokens.truncate(limit - 1);
            tokens.push(last);
        }
        if tokens.is_empty() {
            return Err(EngineError::Embed("text has no tokens".into()));
        }
        self.ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        batch.add_sequence(&tokens, 0, false).map_err(|e| EngineError::Embed(e.to_string()))?;
        self.ctx.decode(&mut batch).map_err(|e| EngineError::Embed(e.to_string()))?;
        let raw = self.ctx.embeddings_seq_ith(0).map_err(|e| EngineError::Embed(e.to_string()))?;
        Ok(normalize(raw))
    }
}

/// L2-normalises a vector (a zero vector stays zero).
pub fn normalize(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        v.to_vec()
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
