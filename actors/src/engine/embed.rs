//! Sentence embeddings with a llama.cpp encoder model (all-MiniLM-L6-v2 in
//! GGUF): mean pooling, L2-normalised. Not thread-safe: one per thread.

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::fault::FaultSlot;
use super::llama::{backend, load_model, CONTEXT_CREATION};
use crate::error::EngineError;

/// Longest input in tokens; BERT needs the whole input in one micro-batch,
/// so longer text is cut (explicitly, here) to this many tokens.
pub const MAX_EMBED_TOKENS: usize = 512;

/// Loads an embedding model for the rest of the process (contexts borrow it).
pub fn load_embedding_model(path: &Path) -> Result<&'static LlamaModel, EngineError> {
    Ok(Box::leak(Box::new(load_model(path)?)))
}

/// The most tokens one input may have (the model's own context, at most 512).
pub fn token_limit(model: &LlamaModel) -> usize {
    (model.n_ctx_train() as usize).clamp(16, MAX_EMBED_TOKENS)
}

/// The tokens the embedding model sees for `text` ([CLS] … [SEP]).
pub fn embed_tokens(model: &LlamaModel, text: &str) -> Vec<LlamaToken> {
    model.vocab().tokenize(text.as_bytes(), true, false)
}

/// An embedding model with its own context.
pub struct LlamaEmbedder {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    dim: usize,
    pub(crate) fault: FaultSlot,
}

impl LlamaEmbedder {
    /// Loads the model and makes a context on it.
    pub fn load(path: &Path, threads: u32) -> Result<Self, EngineError> {
        Self::on(load_embedding_model(path)?, threads)
    }

    /// A fresh context on an already loaded model (a restart reuses the weights).
    pub fn on(model: &'static LlamaModel, threads: u32) -> Result<Self, EngineError> {
        let n_ctx = token_limit(model) as u32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads.max(1) as i32)
            .with_n_threads_batch(threads.max(1) as i32)
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::Mean);
        let ctx = {
            let _one_at_a_time = CONTEXT_CREATION.lock().unwrap_or_else(|e| e.into_inner());
            model.new_context(backend()?, params).map_err(|e| EngineError::Context(e.to_string()))?
        };
        let dim = model.n_embd() as usize;
        Ok(Self { model, ctx, dim, fault: FaultSlot::default() })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds one text; the result has unit length. Text longer than the
    /// model's limit is cut to its first tokens (callers that must not cut,
    /// like `/v1/embeddings`, check [`token_limit`] first).
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, EngineError> {
        let limit = (self.ctx.n_ubatch() as usize).min(MAX_EMBED_TOKENS);
        let mut tokens = embed_tokens(self.model, text);
        if tokens.len() > limit {
            // Keep the closing [SEP] the model was trained with.
            let last = *tokens.last().expect("non-empty");
            tokens.truncate(limit - 1);
            tokens.push(last);
        }
        if tokens.is_empty() {
            return Err(EngineError::Embed("text has no tokens".into()));
        }
        self.fault.fire()?;
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
