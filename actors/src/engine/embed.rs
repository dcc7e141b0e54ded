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

/// Most texts in one decode of the embedding context.
pub const BATCH_SEQUENCES: usize = 16;

/// Most tokens in one decode of the embedding context. An encoder needs a
/// whole batch in one micro-batch, and llama.cpp computes attention over the
/// whole batch (masked per sequence), which grows with the square of its
/// tokens: measured on 2 cores, 64 short texts in one decode were slower than
/// one at a time, while up to 16 texts and 256 tokens cost the same per text.
/// On CPU a text costs what its tokens cost, so batching here is for sharing
/// decodes between waiting callers and bounding how long a chat turn waits
/// behind bulk work (one batch), not for speed.
pub const BATCH_TOKENS: usize = 256;

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
        // One input may be as long as the model allows (512), alone in its batch.
        let n_ctx = BATCH_TOKENS.max(token_limit(model)) as u32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_seq_max(BATCH_SEQUENCES as u32)
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
        let mut v = self.embed_batch(&[text])?;
        v.pop().ok_or_else(|| EngineError::Embed("no vector returned".into()))
    }

    /// Embeds several texts, one unit vector each, in order. Texts go into
    /// one llama.cpp batch as distinct sequences (up to [`BATCH_SEQUENCES`]
    /// texts and [`BATCH_TOKENS`] tokens per decode; a longer text alone).
    pub fn embed_batch<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<Vec<Vec<f32>>, EngineError> {
        let limit = token_limit(self.model);
        let mut inputs = Vec::with_capacity(texts.len());
        for text in texts {
            let mut tokens = embed_tokens(self.model, text.as_ref());
            if tokens.len() > limit {
                // Keep the closing [SEP] the model was trained with.
                let last = *tokens.last().expect("non-empty");
                tokens.truncate(limit - 1);
                tokens.push(last);
            }
            if tokens.is_empty() {
                return Err(EngineError::Embed("text has no tokens".into()));
            }
            inputs.push(tokens);
        }
        self.fault.fire()?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        while start < inputs.len() {
            // As many texts as fit in one decode.
            let mut end = start;
            let mut n_tokens = 0;
            while end < inputs.len()
                && end - start < BATCH_SEQUENCES
                && (end == start || n_tokens + inputs[end].len() <= BATCH_TOKENS)
            {
                n_tokens += inputs[end].len();
                end += 1;
            }
            self.ctx.clear_kv_cache();
            let mut batch = LlamaBatch::new(n_tokens, (end - start) as i32);
            for (seq, tokens) in inputs[start..end].iter().enumerate() {
                batch.add_sequence(tokens, seq as i32, false).map_err(|e| EngineError::Embed(e.to_string()))?;
            }
            self.ctx.decode(&mut batch).map_err(|e| EngineError::Embed(e.to_string()))?;
            for seq in 0..(end - start) {
                let raw = self.ctx.embeddings_seq_ith(seq as i32).map_err(|e| EngineError::Embed(e.to_string()))?;
                out.push(normalize(raw));
            }
            start = end;
        }
        Ok(out)
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
