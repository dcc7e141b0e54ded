//! The seam between scheduling and inference. The pool makes its instances
//! from an [`InstanceSource`] (a context on an [`Engine`]'s weights, or a
//! remote llama-server) and then only talks to each one's [`InstanceBackend`];
//! the real engine is llama.cpp ([`llama::LlamaEngine`]), and tests of the
//! pool use a fake. Nothing here knows the pool.

pub mod batch;
pub mod cpu;
pub mod embed;
pub mod fault;
pub mod grammar;
pub mod kv_cache;
pub mod kv_tiers;
pub mod llama;
pub mod prompt;
pub mod remote;
pub mod sampling;
mod source;
pub mod streams;
pub mod text;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{channel, Receiver, Sender};

use crate::error::EngineError;
use crate::params::{ChatMessage, Completion, GenerateRequest, PreparedRequest, RawPrompt};
pub use kv_tiers::{CacheKey, KvTiers};
pub use source::InstanceSource;
pub use streams::SlotStreams;

/// What one sequence tells whoever started it: text pieces as they are
/// produced, then exactly one `Done`.
#[derive(Debug)]
pub enum SeqEvent {
    Piece(String),
    /// A generated token's log-probabilities (when the request asked), sent
    /// before the piece that carries its text (a piece may be held back).
    Logprob(crate::params::TokenLogprob),
    Done(Result<Completion, EngineError>),
}

/// Events one sequence may have waiting for its reader. A reader that falls
/// this far behind pauses its own sequence (the step loop leaves it out of
/// the batch until there is room again; the other sequences go on), so a
/// slow client never grows memory and never slows anyone else.
pub const SEQ_BUFFER: usize = 64;

/// Longest a sequence stays paused for a reader that does not read, by
/// default ([`InstanceOptions::max_pause`]); then it is cut and its slot freed.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Where a sequence's events go: one bounded channel from the producer (the
/// step loop, or a remote instance's job) straight to the reader. A closed
/// receiver cancels the sequence at the next step (between tokens and
/// between prompt chunks). One place is always kept for the `Done` event.
#[derive(Clone, Debug)]
pub struct SeqSink(Sender<SeqEvent>, Arc<tokio::sync::watch::Sender<Option<SeqEnd>>>);

/// How a sequence ended, told apart from its events: whoever holds the
/// sequence's slot hears it even while nobody reads the events (a client
/// that stopped reading must not keep the slot).
#[derive(Clone, Debug)]
pub enum SeqEnd {
    /// Finished or cancelled; the instance is fine. Tokens generated.
    Ok(u32),
    /// Refused or failed; `instance_fault` when the instance is broken.
    Failed { instance_fault: bool, reason: String },
}

/// Watches a sequence's end ([`SeqSink::ended`]).
pub type SeqEndWatch = tokio::sync::watch::Receiver<Option<SeqEnd>>;

/// The reading half of a sequence's events.
pub type SeqEvents = Receiver<SeqEvent>;

/// The reader went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderGone;

/// Why [`SeqSink::send`] could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// The reader went away.
    ReaderGone,
    /// The reader took nothing for [`MAX_PAUSE`]: the reply is cut.
    Stalled,
}

impl SeqSink {
    /// A sequence's channel: [`SEQ_BUFFER`] events.
    pub fn channel() -> (SeqSink, SeqEvents) {
        Self::with_capacity(SEQ_BUFFER)
    }

    /// A channel of `events` places (tests use small ones).
    pub fn with_capacity(events: usize) -> (SeqSink, SeqEvents) {
        let (tx, rx) = channel(events.max(2));
        let (end, _) = tokio::sync::watch::channel(None);
        (SeqSink(tx, Arc::new(end)), rx)
    }

    /// The sequence's end as it happens, whether or not its events are
    /// read; closed without a value when every sink is dropped unended (the
    /// instance's loop died).
    pub fn ended(&self) -> SeqEndWatch {
        self.1.subscribe()
    }

    /// Sends a piece or log-probabilities without waiting: `Ok(None)` sent,
    /// `Ok(Some(event))` no room (the event is handed back: the caller keeps
    /// it and pauses the sequence).
    pub fn offer(&self, event: SeqEvent) -> Result<Option<SeqEvent>, ReaderGone> {
        if self.0.is_closed() {
            return Err(ReaderGone);
        }
        // The last place is the `Done` event's.
        if self.0.capacity() <= 1 {
            return Ok(Some(event));
        }
        match self.0.try_send(event) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(event)) => Ok(Some(event)),
            Err(TrySendError::Closed(_)) => Err(ReaderGone),
        }
    }

    /// Sends a piece, waiting for room (a remote instance's job, whose
    /// reader's pace then paces the HTTP stream it reads); past
    /// [`MAX_PAUSE`] without room the reply is cut ([`Undelivered::Stalled`]).
    pub async fn send(&self, event: SeqEvent) -> Result<(), Undelivered> {
        let deadline = tokio::time::Instant::now() + MAX_PAUSE;
        let mut event = event;
        loop {
            match self.offer(event).map_err(|_| Undelivered::ReaderGone)? {
                None => return Ok(()),
                Some(back) => event = back,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Undelivered::Stalled);
            }
            // tokio's sender cannot wait for two places (one kept for
            // `Done`): look again shortly, only while the reader lags.
            tokio::select! {
                _ = self.0.closed() => return Err(Undelivered::ReaderGone),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }

    /// The sequence's last event. Always fits: pieces leave it a place.
    pub fn done(&self, result: Result<Completion, EngineError>) {
        let end = match &result {
            Ok(c) => SeqEnd::Ok(c.usage.completion_tokens),
            Err(e) => SeqEnd::Failed { instance_fault: e.is_instance_fault(), reason: e.to_string() },
        };
        let _ = self.0.try_send(SeqEvent::Done(result));
        self.1.send_if_modified(|v| v.is_none() && v.replace(end).is_none());
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Resolves when the reader is gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// Per-instance settings fixed when its context is created.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    /// Tokens one sequence may hold (prompt + generated).
    pub n_ctx: u32,
    /// CPU threads used by this instance's context.
    pub n_threads: u32,
    /// Sequences decoded together in one context (continuous batching).
    pub slots: u32,
    /// Most prompt tokens decoded in one step, over all sequences: a long
    /// prompt is read in chunks so that other streams keep going.
    pub prefill_chunk: u32,
    /// Lower the threads while other processes keep cores busy, and raise
    /// them again when the cores are free ([`cpu`]).
    pub adapt_threads: bool,
    /// Longest a sequence stays paused for a reader that takes nothing;
    /// then it ends as [`crate::params::FinishReason::Stalled`].
    pub max_pause: Duration,
    /// Where conversations' caches wait outside the slots (memory and disk),
    /// shared by every instance; none: each instance keeps a memory tier of
    /// [`DEFAULT_INSTANCE_KV_RAM`] bytes of its own.
    pub kv: Option<std::sync::Arc<KvTiers>>,
}

impl InstanceOptions {
    /// One sequence of `n_ctx` tokens on `n_threads` threads (lowered while
    /// other processes keep cores busy).
    pub fn single(n_ctx: u32, n_threads: u32) -> Self {
        Self {
            n_ctx,
            n_threads,
            slots: 1,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            adapt_threads: true,
            max_pause: MAX_PAUSE,
            kv: None,
        }
    }

    /// The KV tiers its instances use.
    pub fn kv_tiers(&self) -> std::sync::Arc<KvTiers> {
        self.kv.clone().unwrap_or_else(|| KvTiers::memory_only(DEFAULT_INSTANCE_KV_RAM))
    }
}

/// Host memory for parked caches of an instance started without shared tiers.
pub const DEFAULT_INSTANCE_KV_RAM: u64 = 256 << 20;

/// Default of [`InstanceOptions::prefill_chunk`].
pub const DEFAULT_PREFILL_CHUNK: u32 = 256;

/// What the engine knows about the loaded weights.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// Short model name (file stem).
    pub model_name: String,
    /// Bytes of the weights, loaded once and shared by every instance.
    pub weights_bytes: u64,
    /// The context length the model was trained with.
    pub n_ctx_train: u32,
    /// True when each request loads the model afresh (the comparison mode).
    pub per_request: bool,
}

#[cfg(feature = "fault-injection")]
pub use fault::Fault;

/// Identity and memory of one live instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Address of the weights this instance decodes with: equal for all
    /// instances that share one copy.
    pub weights_addr: usize,
    /// Bytes of this instance's KV cache, estimated as n_ctx × layers × 2 (K
    /// and V) × KV width × 2 bytes: llama.cpp's default f16 cache, with the
    /// KV width taken as n_embd × n_head_kv / n_head (one head size for K and V).
    pub kv_bytes_estimate: u64,
    /// Where a remote instance is served (URL without credentials); `None`
    /// for a context in this process.
    pub endpoint: Option<String>,
}

/// Loads weights once and creates instances (contexts) on them.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> EngineInfo;

    /// Creates one instance; called on the thread that will own it.
    fn create_instance(&self, id: usize, opts: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError>;

    /// Number of prompt tokens `messages` take once the chat template is applied.
    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        Ok(self.prompt_tokens(messages)?.len() as u32)
    }

    /// Number of tokens of plain text (no special-token parsing).
    fn count_tokens(&self, text: &str) -> u32;

    /// The prompt's token ids once the chat template is applied (message text
    /// never parsed for special tokens).
    fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError>;

    /// A raw prompt's token ids ([`crate::params::GenerateRequest::raw_prompt`]):
    /// the vocabulary's BOS where it wants one, special tokens parsed.
    fn raw_prompt_tokens(&self, _text: &str) -> Result<Vec<i32>, EngineError> {
        Err(EngineError::RemoteSetup("this engine cannot tokenize raw prompts".into()))
    }

    /// The one check of a request, for sequences of `n_ctx` tokens: its
    /// sampling, its grammar, its prompt tokenized once (messages with the
    /// chat template, or the raw prompt; raw token ids are taken as they
    /// are, within the vocabulary), and the prompt plus `max_tokens` within
    /// `n_ctx`. Tokenizing is blocking work (a remote tokenizer is an HTTP
    /// call): callers on an async executor run it on a blocking thread.
    fn prepare(&self, request: GenerateRequest, n_ctx: u32) -> Result<PreparedRequest, EngineError> {
        request.sampling.validate_for(n_ctx, self.n_vocab())?;
        let prompt = match &request.raw_prompt {
            None => self.prompt_tokens(&request.messages)?,
            Some(RawPrompt::Text(text)) if text.is_empty() => {
                let value = "\"\"".into();
                return Err(EngineError::InvalidParam { field: "prompt", rule: "must not be empty", value });
            }
            Some(RawPrompt::Text(text)) => self.raw_prompt_tokens(text)?,
            Some(RawPrompt::Tokens(ids)) => ids.clone(),
        };
        if !matches!(request.raw_prompt, Some(RawPrompt::Tokens(_))) {
            crate::params::tokenized(prompt.len());
        }
        checked_prompt(self, request, prompt, n_ctx)
    }

    /// [`Self::prepare`] for a prompt its caller has tokenized already (the
    /// chat layer counts its prompt while building it): the ids are checked
    /// against the vocabulary, not tokenized again.
    fn prepare_tokens(
        &self,
        request: GenerateRequest,
        prompt: Vec<i32>,
        n_ctx: u32,
    ) -> Result<PreparedRequest, EngineError> {
        request.sampling.validate_for(n_ctx, self.n_vocab())?;
        checked_prompt(self, request, prompt, n_ctx)
    }

    /// The CPU features the llama.cpp build in this process uses (AVX2,
    /// AVX512, …), as llama.cpp reports them; none when nothing runs here.
    fn cpu_features(&self) -> Vec<String> {
        Vec::new()
    }

    /// The local instances' decode threads and the cores other processes
    /// leave free ([`cpu::CpuMonitor`]); none without local instances.
    fn cpu_status(&self) -> Option<cpu::CpuStatus> {
        None
    }

    /// Checks a GBNF grammar before a request takes an instance (a 400 for
    /// the client rather than an error on the step loop). An engine without
    /// the model here leaves it to the remote, which refuses it itself.
    fn check_grammar(&self, _gbnf: &str) -> Result<(), EngineError> {
        Ok(())
    }

    /// Size of the tokenizer's vocabulary, checked against remote instances.
    fn n_vocab(&self) -> Option<u32> {
        None
    }

    /// Where prompts are tokenized: `("local", model)` with the GGUF here,
    /// `("remote", url)` through a remote's `/tokenize`.
    fn tokenizer(&self) -> (&'static str, String) {
        ("local", self.info().model_name)
    }
}

/// The rest of [`Engine::prepare`] once the sampling is valid and the
/// prompt tokenized: the grammar compiles, the ids are the vocabulary's
/// (llama.cpp aborts the process on one outside it), and prompt plus reply fit.
fn checked_prompt<E: Engine + ?Sized>(
    engine: &E,
    mut request: GenerateRequest,
    prompt: Vec<i32>,
    n_ctx: u32,
) -> Result<PreparedRequest, EngineError> {
    // A JSON schema becomes a grammar here, on a parser thread (checked first).
    if let Some(schema) = request.sampling.json_schema.take() {
        request.sampling.grammar = Some(grammar::schema_to_gbnf(&schema)?);
    }
    if let Some(gbnf) = &request.sampling.grammar {
        engine.check_grammar(gbnf)?;
    }
    if prompt.is_empty() && request.raw_prompt.is_none() {
        let value = "[]".into();
        return Err(EngineError::InvalidParam { field: "messages", rule: "must render to a prompt", value });
    }
    RawPrompt::checked_ids(&prompt, engine.n_vocab())?;
    let max_tokens = sampling::check_fits(prompt.len() as u32, request.sampling.max_tokens, n_ctx)?;
    Ok(PreparedRequest::checked(request, prompt, max_tokens, n_ctx))
}

/// A health probe's answer ([`InstanceBackend::probe`]).
pub enum ProbeReply {
    /// Checked at once (a local context decodes one token between steps).
    Now(Result<(), EngineError>),
    /// Answered later, on the instance's thread (a remote's `/health`).
    Later(LocalBoxFuture<'static, Result<(), EngineError>>),
}

impl From<Result<(), EngineError>> for ProbeReply {
    fn from(result: Result<(), EngineError>) -> Self {
        Self::Now(result)
    }
}

/// One instance: its own context and KV cache, with `slots()` sequences
/// decoded together, or a remote's slots. Created, used and dropped on its
/// instance's own thread, by the pool's model actor that owns it, so it
/// need not be `Send`.
pub trait InstanceBackend {
    /// Sequences it runs at once, and the KV stream each lives in.
    fn streams(&self) -> Arc<SlotStreams>;

    /// Starts `request` in `slot`; a sequence still in that slot ends as
    /// cancelled first. `key` names whose cache the prompt may reuse (its
    /// conversation's, its namespace's). A refused request is answered on `sink` at once.
    fn start(&mut self, slot: usize, request: PreparedRequest, key: CacheKey, started: Instant, sink: SeqSink);

    /// The instance is retired or its owner is gone (not after a failure):
    /// save what the slots hold.
    fn close(&mut self) {}

    /// Ends the sequence in `slot`, if any, as cancelled.
    fn cancel(&mut self, slot: usize);

    /// Sequences started and not yet finished that need [`Self::step`] to
    /// go on (a remote's run on their own: none).
    fn active(&self) -> usize;

    /// One step for every active sequence that can go on (a sequence whose
    /// reader lags is paused). Returns whether anything was decoded. An
    /// error means the context is broken: every sequence has been told, and
    /// the instance must be replaced.
    fn step(&mut self) -> Result<bool, EngineError>;

    /// A cheap real check that the instance still works, run between steps.
    fn probe(&mut self) -> ProbeReply;

    fn info(&self) -> InstanceInfo;

    /// Test hook: makes the next decode misbehave.
    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_for_the_pause_limit_has_its_reply_cut_not_cancelled() {
        // Two places: one for a piece, one kept for the `Done` event.
        let (sink, events) = SeqSink::with_capacity(2);
        sink.send(SeqEvent::Piece("a".into())).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(sink.send(SeqEvent::Piece("b".into())).await, Err(Undelivered::Stalled));
        assert!(started.elapsed() >= MAX_PAUSE);
        drop(events);
        assert_eq!(sink.send(SeqEvent::Piece("c".into())).await, Err(Undelivered::ReaderGone));
    }
}
