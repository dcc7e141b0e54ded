//! The decode loop. It steps a [`Sequence`] (prompt, sampler, text stream,
//! counters) rather than "a request", so that one context can later step
//! several sequences in one batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::fault::FaultSlot;
use super::kv_cache::{SeqCaches, SCRATCH_SEQ};
use super::prompt::{tokenize_chat, ChatTemplate};
use super::text::TextStream;
use crate::error::EngineError;
use crate::params::{Completion, FinishReason, GenerateRequest, SamplingParams, Usage};

/// Builds the sampler chain; temperature 0 is greedy.
pub fn build_sampler(model: &LlamaModel, p: &SamplingParams) -> LlamaSampler {
    let mut chain = Vec::new();
    let penalised = p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
    if penalised && p.repeat_last_n > 0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            p.repeat_last_n,
            p.repeat_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        ));
    }
    if p.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if p.top_k > 0 {
            chain.push(LlamaSampler::top_k(p.top_k));
        }
        chain.push(LlamaSampler::top_p(p.top_p, 1));
        if p.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(p.min_p, 1));
        }
        chain.push(LlamaSampler::temp(p.temperature));
        let seed = p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
        });
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

/// Decodes a batch (after an injected test fault, in test builds).
fn decode(ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch, fault: &mut FaultSlot) -> Result<(), EngineError> {
    fault.fire()?;
    ctx.decode(batch).map_err(|e| EngineError::Decode(e.to_string()))
}

/// One sequence being generated in a context.
struct Sequence {
    seq_id: i32,
    n_past: i32,
    /// Index in the last batch of the logits to sample from.
    logits_idx: i32,
    sampler: LlamaSampler,
    text: TextStream,
    prompt_tokens: u32,
    generated: u32,
    max_tokens: u32,
    started: Instant,
    first_token: Option<Instant>,
    /// Prompt tokens whose KV entries were reused from the cache.
    cached_tokens: u32,
}

enum Step {
    /// A token was produced; the next one needs a decode of it.
    Continue(LlamaToken),
    Done(FinishReason),
}

impl Sequence {
    /// Samples one token and streams its text.
    fn step(&mut self, ctx: &LlamaContext<'_>, model: &LlamaModel, emit: &mut dyn FnMut(&str) -> bool) -> Step {
        let token = self.sampler.sample(ctx, self.logits_idx);
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        if model.vocab().is_eog(token) {
            return Step::Done(FinishReason::Stop);
        }
        self.generated += 1;
        let mut bytes = Vec::with_capacity(16);
        model.vocab().token_to_piece_into(token, &mut bytes, false, None);
        let pushed = self.text.push(&bytes);
        if !pushed.text.is_empty() && !emit(&pushed.text) {
            return Step::Done(FinishReason::Cancelled);
        }
        if pushed.stopped {
            return Step::Done(FinishReason::Stop);
        }
        if self.generated >= self.max_tokens {
            return Step::Done(FinishReason::Length);
        }
        Step::Continue(token)
    }

    fn usage(&self) -> Usage {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let after_first = now.duration_since(first).as_secs_f64();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated,
            time_to_first_token_ms: first.duration_since(self.started).as_secs_f64() * 1e3,
            total_ms: now.duration_since(self.started).as_secs_f64() * 1e3,
            tokens_per_second: if after_first > 0.0 && self.generated > 1 {
                (self.generated - 1) as f64 / after_first
            } else {
                0.0
            },
            queue_wait_ms: 0.0,
            first_token_at: self.first_token,
            cached_tokens: self.cached_tokens,
        }
    }
}

/// Checks that the prompt plus the requested tokens fit in the context.
pub fn check_fits(prompt_tokens: u32, max_tokens: u32, n_ctx: u32) -> Result<(), EngineError> {
    let total = prompt_tokens.saturating_add(max_tokens);
    if total > n_ctx {
        return Err(EngineError::PromptTooLong { prompt_tokens, max_tokens, total, n_ctx });
    }
    Ok(())
}

/// Runs one request to completion on `ctx`. `caches` records what each
/// cached sequence holds: the request takes the sequence that shares the
/// longest prefix with its prompt, keeps that prefix and decodes only the
/// rest. On return `caches` describes the KV buffer again; after a failure
/// both are emptied.
#[allow(clippy::too_many_arguments)]
pub fn run_generation(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    template: &ChatTemplate,
    request: &GenerateRequest,
    emit: &mut dyn FnMut(&str) -> bool,
    cancel: &AtomicBool,
    fault: &mut FaultSlot,
    caches: &mut SeqCaches,
) -> Result<Completion, EngineError> {
    let result = generate_reusing(ctx, model, template, request, emit, cancel, fault, caches);
    if result.is_err() {
        caches.clear();
        ctx.clear_kv_cache();
    }
    result
}

/// Decodes a batch of sequence `seq`; when the shared KV buffer is full,
/// evicts other cached sequences (least recently used first) and retries.
fn decode_evicting(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    fault: &mut FaultSlot,
    caches: &mut SeqCaches,
    seq: usize,
) -> Result<(), EngineError> {
    fault.fire()?;
    loop {
        match ctx.decode(batch) {
            Ok(()) => return Ok(()),
            Err(DecodeError::NoKvCacheSlot) => {
                let Some(victim) = caches.evict_other(seq) else {
                    return Err(EngineError::Decode("the KV cache is full".into()));
                };
                ctx.clear_kv_cache_seq(Some(victim as u32), None, None)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            Err(e) => return Err(EngineError::Decode(e.to_string())),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn generate_reusing(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    template: &ChatTemplate,
    request: &GenerateRequest,
    emit: &mut dyn FnMut(&str) -> bool,
    cancel: &AtomicBool,
    fault: &mut FaultSlot,
    caches: &mut SeqCaches,
) -> Result<Completion, EngineError> {
    let started = Instant::now();
    request.sampling.validate()?;
    let prompt = tokenize_chat(model, template, &request.messages)?;
    check_fits(prompt.len() as u32, request.sampling.max_tokens, ctx.n_ctx())?;

    // Keep the shared prefix (at least the last prompt token is decoded again:
    // its logits give the first new token) and drop the rest of that sequence.
    let (slot, shared) = caches.choose(&prompt);
    let seq_id = slot as u32;
    let mut keep = shared.min(prompt.len() - 1);
    // Everything from `keep` on goes, whether the record names it or not.
    {
        let dropped = ctx
            .clear_kv_cache_seq(Some(seq_id), Some(keep as u32), None)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        if !dropped {
            // The memory cannot drop a tail (some model kinds): start over.
            ctx.clear_kv_cache_seq(Some(seq_id), None, None).map_err(|e| EngineError::Decode(e.to_string()))?;
            keep = 0;
        }
    }
    caches.take(slot).truncate(keep);

    let mut seq = Sequence {
        seq_id: slot as i32,
        n_past: keep as i32,
        logits_idx: 0,
        sampler: build_sampler(model, &request.sampling),
        text: TextStream::new(&request.sampling.stop),
        prompt_tokens: prompt.len() as u32,
        generated: 0,
        max_tokens: request.sampling.max_tokens,
        started,
        first_token: None,
        cached_tokens: keep as u32,
    };

    let n_batch = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    // The rest of the prompt goes in chunks of at most n_batch tokens (more aborts llama.cpp).
    for chunk in prompt[keep..].chunks(n_batch) {
        // Between chunks: stopped by the watchdog, or nobody listens any more.
        if cancel.load(Ordering::Relaxed) || !emit("") {
            return Ok(Completion { usage: seq.usage(), finish_reason: FinishReason::Cancelled });
        }
        batch.clear();
        for &token in chunk {
            let last = seq.n_past as usize == prompt.len() - 1;
            batch.add(token, seq.n_past, &[seq.seq_id], last).map_err(|e| EngineError::Decode(e.to_string()))?;
            seq.n_past += 1;
        }
        decode_evicting(ctx, &mut batch, fault, caches, slot)?;
        caches.tokens(slot).extend_from_slice(chunk);
    }
    seq.logits_idx = batch.n_tokens() - 1;

    let finish = loop {
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        match seq.step(ctx, model, emit) {
            Step::Done(reason) => break reason,
            Step::Continue(token) => {
                batch.clear();
                batch.add(token, seq.n_past, &[seq.seq_id], true).map_err(|e| EngineError::Decode(e.to_string()))?;
                seq.n_past += 1;
                decode_evicting(ctx, &mut batch, fault, caches, slot)?;
                caches.tokens(slot).push(token);
                seq.logits_idx = 0;
            }
        }
    };
    if finish != FinishReason::Cancelled {
        let tail = seq.text.finish();
        if !tail.text.is_empty() {
            emit(&tail.text);
        }
    }
    Ok(Completion { usage: seq.usage(), finish_reason: finish })
}

/// A cheap real health check: decode one token on the scratch sequence (the
/// generation sequence's cache stays as it is) and check that the logits are finite.
pub fn probe_context(ctx: &mut LlamaContext<'_>, model: &LlamaModel, fault: &mut FaultSlot) -> Result<(), EngineError> {
    let scratch = Some(SCRATCH_SEQ as u32);
    let clear = |ctx: &mut LlamaContext<'_>| {
        ctx.clear_kv_cache_seq(scratch, None, None).map_err(|e| EngineError::Decode(e.to_string()))
    };
    clear(ctx)?;
    let mut batch = LlamaBatch::new(1, 1);
    let token = model.vocab().bos();
    let token = if token.0 < 0 { LlamaToken(0) } else { token };
    batch.add(token, 0, &[SCRATCH_SEQ], true).map_err(|e| EngineError::Decode(e.to_string()))?;
    decode(ctx, &mut batch, fault)?;
    let ok = ctx.get_logits_ith(0).iter().take(64).all(|x| x.is_finite());
    clear(ctx)?;
    if ok {
        Ok(())
    } else {
        Err(EngineError::Decode("probe produced non-finite logits".into()))
    }
}
