//! The seam between scheduling and inference. The pool only talks to
//! [`Engine`] and [`InstanceBackend`]; the real implementation is llama.cpp
//! ([`llama::LlamaEngine`]), and unit tests of the pool use a fake.

pub mod embed;
pub mod fault;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod prompt;
pub mod text;

use std::sync::atomic::AtomicBool;

use crate::error::EngineError;
use crate::params::{ChatMessage, Completion, GenerateRequest};

/// Per-instance settings fixed when its context is created.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    /// Context size in tokens (prompt + generated).
    pub n_ctx: u32,
    /// CPU threads used by this instance's context.
    pub n_threads: u32,
}

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
}

/// Loads weights once and creates instances (contexts) on them.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> EngineInfo;

    /// Creates one instance; called on the thread that will own it.
    fn create_instance(&self, id: usize, opts: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError>;

    /// Number of prompt tokens `messages` take once the chat template is applied.
    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError>;

    /// Number of tokens of plain text (no special-token parsing).
    fn count_tokens(&self, text: &str) -> u32;
}

/// One instance: its own context and KV cache. Lives on one thread.
pub trait InstanceBackend: Send {
    /// Runs one generation, handing each text piece to `emit`; `emit` returns
    /// false when the receiver is gone, which ends generation as cancelled.
    /// `cancel` is checked before every token.
    fn generate(
        &mut self,
        request: &GenerateRequest,
        emit: &mut dyn FnMut(&str) -> bool,
        cancel: &AtomicBool,
    ) -> Result<Completion, EngineError>;

    /// A cheap real check that the context still decodes.
    fn probe(&mut self) -> Result<(), EngineError>;

    fn info(&self) -> InstanceInfo;

    /// Test hook: makes the next decode misbehave.
    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault);
}
