//! Continuous batching on one context: every step decodes one `llama_batch`
//! holding the next token of each generating sequence plus a bounded chunk of
//! pending prompt tokens, then samples each sequence from its own logits and
//! streams its piece to its own sink. Each slot keeps the tokens its KV cache
//! holds, so a request keeps the longest common prefix and decodes the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{DecodeError, LlamaStateSeqFlags};

use super::cpu::CpuShare;
use super::fault::FaultSlot;
use super::kv_cache::{restore_source, SlotCache, Source};
use super::kv_tiers::{CacheKey, KvTiers, Tier};
use super::streams::{move_out, passes, SlotStreams, Use, MOVE_PAUSED_AFTER};
use super::sampling::{build_sampler, grammar_sampler, sample_constrained, token_logprobs};
use super::text::TextStream;
#[cfg(feature = "fault-injection")]
use super::Fault;
use super::{SeqEvent, SeqSink, MAX_PAUSE};
use crate::error::EngineError;
use crate::params::{Completion, FinishReason, PreparedRequest, Usage};

fn kv_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode(e.to_string())
}

/// One sequence being generated in a slot.
struct Running {
    sink: SeqSink,
    /// Events its reader had no room for, oldest first: while any wait the
    /// sequence is paused (left out of the batch).
    held: Vec<SeqEvent>,
    paused_at: Option<Instant>,
    /// How it ended, while its reader has not taken its last pieces yet.
    ending: Option<FinishReason>,
    prompt: Vec<LlamaToken>,
    sampler: LlamaSampler,
    /// The request's grammar, when it has one ([`sample_constrained`]).
    grammar: Option<LlamaSampler>,
    /// Alternatives per token whose log-probabilities are sent; none: not computed.
    logprobs: Option<u32>,
    text: TextStream,
    generated: u32,
    max_tokens: u32,
    started: Instant,
    first_token: Option<Instant>,
    /// Prompt tokens whose KV entries came from the cache.
    cached_tokens: u32,
    /// Sampled and streamed, not yet decoded.
    next: Option<LlamaToken>,
    /// Index of this sequence's logits in the batch just decoded.
    logits_idx: Option<i32>,
}

impl Running {
    /// Hands `event` to the reader, or keeps it (and pauses) when the reader
    /// has no room. False when the reader is gone.
    fn emit(&mut self, event: SeqEvent) -> bool {
        if !self.held.is_empty() {
            self.held.push(event);
            return true;
        }
        match self.sink.offer(event) {
            Ok(None) => true,
            Ok(Some(back)) => {
                self.held.push(back);
                self.paused_at.get_or_insert_with(Instant::now);
                true
            }
            Err(_) => false,
        }
    }

    /// Hands over what was kept, as far as there is room. False when the reader is gone.
    fn flush(&mut self) -> bool {
        while !self.held.is_empty() {
            match self.sink.offer(self.held.remove(0)) {
                Ok(None) => {}
                Ok(Some(back)) => {
                    self.held.insert(0, back);
                    return true;
                }
                Err(_) => return false,
            }
        }
        self.paused_at = None;
        true
    }

    fn paused(&self) -> bool {
        !self.held.is_empty()
    }

    fn usage(&self) -> Usage {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        let after_first = now.duration_since(first).as_secs_f64();
        Usage {
            prompt_tokens: self.prompt.len() as u32,
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

struct Slot {
    cache: SlotCache,
    run: Option<Running>,
}

/// A context's sequence slots and the batch they share.
pub struct Batcher<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    slots: Vec<Slot>,
    /// The KV stream (llama.cpp sequence id) of each slot.
    streams: Arc<SlotStreams>,
    /// Where caches wait outside the slots (memory and disk, by
    /// conversation): a conversation whose slot is given to another keeps
    /// its KV there, and its next turn restores it instead of reading its
    /// prompt again. Shared by every instance of the process.
    tiers: Arc<KvTiers>,
    batch: LlamaBatch<'static>,
    /// Most prompt tokens decoded in one step, over all sequences.
    prefill_chunk: usize,
    /// Tokens one sequence may hold (prompt + reply).
    seq_ctx: u32,
    fault: FaultSlot,
    piece: Vec<u8>,
    /// Sequences whose batch entries were added this step, in batch order:
    /// (slot, tokens added).
    planned: Vec<(usize, usize)>,
    /// Slots still reading their prompt, oldest request first (kept to reuse its buffer).
    reading: Vec<usize>,
    /// Threads to decode with, when they follow the free cores; and what the
    /// context uses now.
    cpu: Option<Arc<CpuShare>>,
    n_threads: u32,
    /// Longest a sequence stays paused for its reader.
    max_pause: Duration,
}

impl<'m> Batcher<'m> {
    /// Sequences a context needs for `slots` slots: one each (the probe
    /// borrows an idle one).
    pub fn sequences(slots: usize) -> u32 {
        slots as u32
    }

    /// `ctx` must have been created with [`Self::sequences`] sequences.
    pub fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        slots: usize,
        seq_ctx: u32,
        prefill_chunk: usize,
        tiers: Arc<KvTiers>,
    ) -> Self {
        let n_batch = ctx.n_batch() as usize;
        let n_threads = ctx.n_threads().0.max(1) as u32;
        Self {
            model,
            ctx,
            slots: (0..slots).map(|_| Slot { cache: SlotCache::default(), run: None }).collect(),
            streams: Arc::new(SlotStreams::new(slots)),
            tiers,
            batch: LlamaBatch::new(n_batch, 1),
            prefill_chunk: prefill_chunk.clamp(1, n_batch.saturating_sub(slots).max(1)),
            seq_ctx,
            fault: FaultSlot::default(),
            piece: Vec::with_capacity(32),
            planned: Vec::with_capacity(slots),
            reading: Vec::with_capacity(slots),
            cpu: None,
            n_threads,
            max_pause: MAX_PAUSE,
        }
    }

    /// Cuts a sequence paused longer than `limit` for its reader.
    pub fn with_max_pause(mut self, limit: Duration) -> Self {
        self.max_pause = limit;
        self
    }

    /// Decodes with `share`'s threads, read before every decode.
    pub fn with_cpu_share(mut self, share: Arc<CpuShare>) -> Self {
        self.cpu = Some(share);
        self
    }

    /// Follows the free cores: a changed share takes effect at this decode.
    fn apply_threads(&mut self) {
        let Some(want) = self.cpu.as_ref().map(|c| c.threads()) else { return };
        if want != self.n_threads {
            self.ctx.set_n_threads(want as i32, want as i32);
            self.n_threads = want;
        }
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Where each slot's sequence lives (the pool reads it to place requests).
    pub fn streams(&self) -> Arc<SlotStreams> {
        self.streams.clone()
    }

    fn seq(&self, slot: usize) -> i32 {
        self.streams.of(slot) as i32
    }

    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.run.is_some()).count()
    }

    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault.set(fault);
    }

    /// Starts `request` in `slot`; a sequence still there ends as cancelled.
    /// A request the engine refuses is answered on `sink` at once.
    pub fn start(&mut self, slot: usize, request: &PreparedRequest, key: CacheKey, started: Instant, sink: SeqSink) {
        if slot >= self.slots.len() {
            sink.done(Err(EngineError::InvalidParam {
                field: "slot",
                rule: "must name one of the instance's slots",
                value: slot.to_string(),
            }));
            return;
        }
        self.finish(slot, FinishReason::Cancelled);
        match self.prepare(slot, request, key, started, sink.clone()) {
            Ok(run) => self.slots[slot].run = Some(run),
            Err(e) => {
                if e.is_instance_fault() {
                    self.fail_all(&e);
                }
                sink.done(Err(e));
            }
        }
    }

    fn prepare(
        &mut self,
        slot: usize,
        request: &PreparedRequest,
        key: CacheKey,
        started: Instant,
        sink: SeqSink,
    ) -> Result<Running, EngineError> {
        // The request was checked once, for sequences of its n_ctx tokens
        // (Engine::prepare); an instance with shorter ones refuses it.
        if request.n_ctx() > self.seq_ctx {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: request.prompt().len() as u32,
                max_tokens: request.max_tokens(),
                total: request.prompt().len() as u32 + request.max_tokens(),
                n_ctx: self.seq_ctx,
            });
        }
        let prompt: Vec<LlamaToken> = request.prompt().iter().map(|id| LlamaToken(*id)).collect();
        let max_tokens = request.max_tokens();
        let seq = self.seq(slot);
        // The slot holds another conversation: park its cache under that
        // conversation's key before it is overwritten, so that its next turn
        // can have it back. Another namespace's tokens are never kept.
        let held = &self.slots[slot].cache;
        if !held.tokens.is_empty() && held.key != key {
            self.park(slot)?;
            if self.slots[slot].cache.key.namespace != key.namespace {
                self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None).map_err(kv_err)?;
                self.slots[slot].cache.tokens.clear();
            }
        }
        self.slots[slot].cache.key = key;
        // A longer prefix held by another slot of the namespace, or by this
        // conversation's parked cache, is restored rather than decoded again.
        let parked = self.tiers.tokens_of(key);
        let held: Vec<(&[LlamaToken], CacheKey)> =
            self.slots.iter().map(|s| (s.cache.tokens.as_slice(), s.cache.key)).collect();
        let mut restored = None;
        if let Some((src, _)) = restore_source(&held, slot, key.namespace, parked.as_deref(), &prompt) {
            let copy = Instant::now();
            let (state, tokens, tier) = match src {
                Source::Slot(i) => (self.seq_state(self.seq(i))?, self.slots[i].cache.tokens.clone(), Tier::Slot),
                Source::Parked => match self.tiers.take(key) {
                    Some(p) => (p.state, p.tokens, src.tier(p.tier)),
                    None => (Vec::new(), Vec::new(), Tier::Memory),
                },
            };
            self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None).map_err(kv_err)?;
            self.slots[slot].cache.tokens.clear();
            // SAFETY: `state` came from llama.cpp's own state_seq_get_data
            // (a slot of this context, or a parked cache of this model and
            // layout whose file checksum and fingerprint were checked).
            let set = state.is_empty()
                || unsafe { self.ctx.state_seq_set_data_ext(&state, seq, LlamaStateSeqFlags::empty()) };
            if !state.is_empty() && set {
                self.slots[slot].cache.tokens = tokens;
                restored = Some((tier, copy.elapsed()));
            } else if !set {
                tracing::warn!(
                    slot,
                    tier = tier.as_str(),
                    "could not restore a cached prefix; reading the prompt instead"
                );
                self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None).map_err(kv_err)?;
            }
        }
        let cache = &mut self.slots[slot].cache;
        // Keep the shared prefix; the last prompt token is always decoded
        // again, since its logits give the first new token.
        let mut keep = cache.common_prefix(&prompt).min(prompt.len() - 1);
        if !self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None).map_err(kv_err)? {
            // This memory cannot drop a tail: start the sequence over.
            self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None).map_err(kv_err)?;
            keep = 0;
        }
        cache.tokens.truncate(keep);
        let tier = match (restored, keep) {
            (_, 0) => None,
            (Some((tier, _)), _) => Some(tier),
            (None, _) => Some(Tier::Slot),
        };
        self.tiers.record(tier, keep as u64, (prompt.len() - keep) as u64, restored.map(|(_, took)| took));
        Ok(Running {
            sink,
            held: Vec::new(),
            paused_at: None,
            ending: None,
            sampler: build_sampler(self.model, request.sampling(), self.seq_ctx),
            grammar: request.sampling().grammar.as_deref().map(|g| grammar_sampler(self.model, g)).transpose()?,
            logprobs: request.sampling().logprobs,
            text: TextStream::new(&request.sampling().stop),
            generated: 0,
            max_tokens,
            started,
            first_token: None,
            cached_tokens: keep as u32,
            next: None,
            logits_idx: None,
            prompt,
        })
    }

    /// llama.cpp's state of sequence `seq` (its KV cells), as bytes.
    fn seq_state(&self, seq: i32) -> Result<Vec<u8>, EngineError> {
        let size = self.ctx.state_seq_get_size_ext(seq, LlamaStateSeqFlags::empty());
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` has the size llama.cpp asked for this sequence.
        let n = unsafe { self.ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq, LlamaStateSeqFlags::empty()) };
        if n != size {
            return Err(kv_err(format!("sequence state: {n} bytes written, {size} expected")));
        }
        Ok(bytes)
    }

    /// Copies slot `slot`'s cache to the memory tier under its conversation's
    /// key (the least recently used caches move on to disk when it is full).
    fn park(&mut self, slot: usize) -> Result<(), EngineError> {
        let copy = Instant::now();
        let state = self.seq_state(self.seq(slot))?;
        let from = &self.slots[slot].cache;
        self.tiers.note_bytes_per_token(state.len() as u64 / from.tokens.len().max(1) as u64);
        self.tiers.park(from.key, from.tokens.clone(), state, copy.elapsed());
        Ok(())
    }

    /// The loop ends (shutdown): every slot's cache goes to the tiers, from
    /// where the process's shutdown writes them to disk.
    pub fn close(&mut self) {
        for slot in 0..self.slots.len() {
            self.finish(slot, FinishReason::Cancelled);
            if !self.slots[slot].cache.tokens.is_empty() {
                if let Err(e) = self.park(slot) {
                    tracing::warn!(slot, error = %e, "could not save a slot's cache at shutdown");
                }
            }
        }
    }

    /// Ends the sequence in `slot` (if any) and tells its sink. Its last
    /// pieces are never dropped: while its reader has no room for them the
    /// sequence stays in its slot, paused, and ends at the step that hands
    /// them over. A cancelled sequence ends at once.
    pub fn finish(&mut self, slot: usize, reason: FinishReason) {
        let Some(run) = self.slots[slot].run.as_mut() else { return };
        let mut reason = reason;
        if reason != FinishReason::Cancelled {
            if run.ending.is_none() {
                let tail = run.text.finish();
                if !tail.text.is_empty() {
                    run.emit(SeqEvent::Piece(tail.text));
                }
                run.ending = Some(reason);
                run.next = None;
            }
            if !run.flush() {
                reason = FinishReason::Cancelled;
            } else if run.paused() {
                return;
            }
        }
        let Some(run) = self.slots[slot].run.take() else { return };
        run.sink.done(Ok(Completion { usage: run.usage(), finish_reason: reason }));
    }

    /// Ends a sequence whose reader took nothing for [`Self::with_max_pause`]:
    /// what it holds back is dropped (the reader is not reading), and its
    /// end says the reply was cut.
    fn finish_stalled(&mut self, slot: usize) {
        let Some(run) = self.slots[slot].run.take() else { return };
        run.sink.done(Ok(Completion { usage: run.usage(), finish_reason: FinishReason::Stalled }));
    }

    /// The context is broken: every sequence ends with `e`, every cache is forgotten.
    fn fail_all(&mut self, e: &EngineError) {
        for s in &mut self.slots {
            if let Some(run) = s.run.take() {
                run.sink.done(Err(e.clone()));
            }
            s.cache.tokens.clear();
        }
        self.ctx.clear_kv_cache();
    }

    /// One step: one decode for every sequence that has work and whose
    /// reader has room. Returns whether anything was decoded, or an error
    /// when the context is broken (every sequence has been told).
    pub fn step(&mut self) -> Result<bool, EngineError> {
        for i in 0..self.slots.len() {
            let Some(run) = self.slots[i].run.as_mut() else { continue };
            // A sequence nobody listens to any more ends here, before its
            // next token or prompt chunk costs anything; a paused one goes
            // on once its reader has taken what was kept.
            if run.sink.is_closed() || !run.flush() {
                self.finish(i, FinishReason::Cancelled);
            } else if let Some(reason) = run.ending.filter(|_| !run.paused()) {
                self.finish(i, reason);
            } else if run.paused_at.is_some_and(|at| at.elapsed() > self.max_pause) {
                tracing::warn!(
                    slot = i,
                    limit_ms = self.max_pause.as_millis() as u64,
                    "a reader took nothing for too long; its reply is cut"
                );
                self.finish_stalled(i);
            }
        }
        if let Err(e) = self.move_paused_out() {
            self.fail_all(&e);
            return Err(e);
        }
        if !self.fill_batch()? {
            return Ok(false);
        }
        let decode_started = Instant::now();
        if let Err(e) = self.decode_batch() {
            self.fail_all(&e);
            return Err(e);
        }
        tracing::trace!(
            tokens = self.batch.n_tokens(),
            sequences = self.planned.len(),
            passes = passes(self.planned.iter().map(|&(i, _)| self.streams.of(i))),
            threads = self.n_threads,
            decode_us = decode_started.elapsed().as_micros() as u64,
            "step"
        );
        self.commit_and_sample();
        Ok(true)
    }

    /// What slot `i` does this step, as far as its stream's place matters.
    fn use_of(&self, i: usize) -> Use {
        match &self.slots[i].run {
            Some(r) if r.paused() && r.paused_at.is_some_and(|at| at.elapsed() >= MOVE_PAUSED_AFTER) => Use::Paused,
            Some(r) if r.paused() => Use::Other,
            Some(_) => Use::Decoding,
            None => Use::Other,
        }
    }

    /// A sequence paused for a while between sequences that decode splits
    /// every step into two passes over the weights (see [`super::streams`]):
    /// it trades KV streams with the sequence at the edge, through host
    /// memory, once. Nothing is copied while no sequence is paused.
    fn move_paused_out(&mut self) -> Result<(), EngineError> {
        if !(0..self.slots.len()).any(|i| self.use_of(i) == Use::Paused) {
            return Ok(());
        }
        for _ in 0..self.slots.len() {
            let Some((paused, edge)) =
                move_out(&self.streams, |i| self.use_of(i), |i| self.slots[i].cache.tokens.len())
            else {
                break;
            };
            let took = Instant::now();
            self.trade_streams(paused, edge)?;
            self.tiers.record_move();
            tracing::debug!(
                slot = paused,
                with = edge,
                tokens = self.slots[paused].cache.tokens.len() + self.slots[edge].cache.tokens.len(),
                copy_ms = took.elapsed().as_secs_f64() * 1e3,
                "a paused sequence moved out from between decoding ones"
            );
        }
        Ok(())
    }

    /// Slots `a` and `b` trade KV streams: each one's cells are saved, both
    /// streams cleared, and each restored into the other's.
    fn trade_streams(&mut self, a: usize, b: usize) -> Result<(), EngineError> {
        let (sa, sb) = (self.seq(a), self.seq(b));
        let (state_a, state_b) = (self.seq_state(sa)?, self.seq_state(sb)?);
        for seq in [sa, sb] {
            self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None).map_err(kv_err)?;
        }
        for (state, seq, had) in [(&state_a, sb, &self.slots[a].cache), (&state_b, sa, &self.slots[b].cache)] {
            // SAFETY: `state` came from llama.cpp's state_seq_get_data on this context.
            if !had.tokens.is_empty() && !unsafe { self.ctx.state_seq_set_data_ext(state, seq, LlamaStateSeqFlags::empty()) } {
                return Err(EngineError::Decode(format!("could not move a sequence's cache to stream {seq}")));
            }
        }
        self.streams.swap(a, b);
        Ok(())
    }

    /// Puts every generating sequence's next token, then prompt chunks (oldest
    /// request first), into the batch. Returns false when there is nothing to do.
    fn fill_batch(&mut self) -> Result<bool, EngineError> {
        self.batch.clear();
        self.planned.clear();
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(run) = s.run.as_mut() else { continue };
            run.logits_idx = None;
            if run.paused() {
                continue;
            }
            if let Some(token) = run.next {
                let pos = s.cache.tokens.len() as i32;
                self.batch.add(token, pos, &[self.streams.of(i) as i32], true).map_err(kv_err)?;
                run.logits_idx = Some(self.batch.n_tokens() - 1);
                self.planned.push((i, 1));
            }
        }
        let mut budget = self.prefill_chunk;
        self.reading.clear();
        let slots = &self.slots;
        self.reading.extend(
            (0..slots.len()).filter(|&i| slots[i].run.as_ref().is_some_and(|r| r.next.is_none() && !r.paused())),
        );
        self.reading.sort_by_key(|&i| slots[i].run.as_ref().map(|r| r.started));
        for k in 0..self.reading.len() {
            let i = self.reading[k];
            if budget == 0 {
                break;
            }
            let seq = self.streams.of(i) as i32;
            let s = &mut self.slots[i];
            let run = s.run.as_mut().expect("reading sequences run");
            let from = s.cache.tokens.len();
            let take = (run.prompt.len() - from).min(budget);
            for (j, &token) in run.prompt[from..from + take].iter().enumerate() {
                let last = from + j + 1 == run.prompt.len();
                self.batch.add(token, (from + j) as i32, &[seq], last).map_err(kv_err)?;
                if last {
                    run.logits_idx = Some(self.batch.n_tokens() - 1);
                }
            }
            budget -= take;
            self.planned.push((i, take));
        }
        Ok(self.batch.n_tokens() > 0)
    }

    /// Decodes the batch. Each sequence has a stream of n_ctx cells of its
    /// own and `check_fits` keeps it within them, so a full cache is a fault.
    fn decode_batch(&mut self) -> Result<(), EngineError> {
        self.fault.fire()?;
        self.apply_threads();
        match self.ctx.decode(&mut self.batch) {
            Ok(()) => Ok(()),
            Err(DecodeError::NoKvCacheSlot) => Err(EngineError::Decode("the KV cache is full".into())),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Records what the decode put in each sequence's cache, then samples
    /// every sequence whose logits are ready and streams its piece.
    fn commit_and_sample(&mut self) {
        for k in 0..self.planned.len() {
            let (i, n) = self.planned[k];
            let s = &mut self.slots[i];
            let run = s.run.as_mut().expect("planned sequences run");
            match run.next.take() {
                Some(token) => s.cache.tokens.push(token),
                None => {
                    let from = s.cache.tokens.len();
                    s.cache.tokens.extend_from_slice(&run.prompt[from..from + n]);
                }
            }
            let Some(idx) = run.logits_idx else { continue };
            let token = if let Some(grammar) = run.grammar.as_mut() {
                match sample_constrained(&mut run.sampler, grammar, &self.ctx, idx) {
                    Ok(token) => token,
                    Err(e) => {
                        // This sequence ends with the error; the others go on.
                        if let Some(run) = s.run.take() {
                            run.sink.done(Err(e));
                        }
                        continue;
                    }
                }
            } else {
                run.sampler.sample(&self.ctx, idx)
            };
            if run.first_token.is_none() {
                run.first_token = Some(Instant::now());
            }
            let vocab = self.model.vocab();
            let end = if vocab.is_eog(token) {
                Some(FinishReason::Stop)
            } else {
                let mut gone = false;
                if let Some(top) = run.logprobs {
                    let lp = token_logprobs(self.model, self.ctx.get_logits_ith(idx), token, top as usize);
                    gone |= !run.emit(SeqEvent::Logprob(lp));
                }
                run.generated += 1;
                self.piece.clear();
                vocab.token_to_piece_into(token, &mut self.piece, false, None);
                let pushed = run.text.push(&self.piece);
                if gone || (!pushed.text.is_empty() && !run.emit(SeqEvent::Piece(pushed.text))) {
                    Some(FinishReason::Cancelled)
                } else if pushed.stopped {
                    Some(FinishReason::Stop)
                } else if run.generated >= run.max_tokens {
                    Some(FinishReason::Length)
                } else {
                    run.next = Some(token);
                    None
                }
            };
            if let Some(reason) = end {
                self.finish(i, reason);
            }
        }
    }

    /// A cheap real health check between steps: decode one token on an idle
    /// slot's sequence, just after what its cache holds, check the logits,
    /// and remove that one cell again (the cache stays as it was). With every
    /// slot busy, the steps themselves show that the context decodes.
    pub fn probe(&mut self) -> Result<(), EngineError> {
        let Some(slot) = (0..self.slots.len())
            .filter(|&i| self.slots[i].run.is_none() && self.slots[i].cache.tokens.len() < self.seq_ctx as usize)
            .min_by_key(|&i| self.slots[i].cache.tokens.len())
        else {
            return Ok(());
        };
        let (seq, pos) = (self.seq(slot), self.slots[slot].cache.tokens.len());
        let mut batch = LlamaBatch::new(1, 1);
        let token = self.model.vocab().bos();
        let token = if token.0 < 0 { LlamaToken(0) } else { token };
        batch.add(token, pos as i32, &[seq], true).map_err(kv_err)?;
        self.fault.fire()?;
        let decoded = self.ctx.decode(&mut batch).map_err(kv_err);
        let ok = decoded.is_ok() && self.ctx.get_logits_ith(0).iter().take(64).all(|x| x.is_finite());
        // Whatever happened, the cell after the cached tokens goes again.
        self.ctx.clear_kv_cache_seq(Some(seq as u32), Some(pos as u32), None).map_err(kv_err)?;
        decoded?;
        if ok {
            Ok(())
        } else {
            Err(EngineError::Decode("probe produced non-finite logits".into()))
        }
    }
}
