//! modelpool's embeddable actors: llama.cpp model instances sharing one copy
//! of the weights, a self-healing pool manager that leases them, and (built on
//! the pool) the chat layer with memory.
//!
//! Start a pool inside an actix system with [`PoolHandle::start`], then call
//! [`PoolHandle::generate`]; see `docs/library.md` and `examples/embedded.rs`
//! for a full example.

pub mod chat;
pub mod engine;
pub mod error;
pub mod http;
pub mod memory;
pub mod params;
pub mod pool;

pub use chat::handle::ChatHandle;
pub use chat::turn::ChatStream;
pub use chat::types::{ChatError, ChatEvent, ChatOptions, ChatReply, SendMessage};
pub use engine::llama::{LlamaEngine, PerRequestEngine};
#[cfg(feature = "fault-injection")]
pub use engine::Fault;
pub use engine::{Engine, EngineInfo, InstanceInfo, InstanceOptions};
pub use error::{EngineError, PoolError};
pub use memory::{Conversation, ConversationId, Durability, EmbedderHandle, Recalled, StoredMessage};
pub use params::{
    ChatMessage, Completion, FinishReason, GenerateRequest, PreparedRequest, Role, SamplingParams, Usage,
};
pub use pool::handle::PoolHandle;
pub use pool::lease::{GenEvent, GenerationStream, Lease};
pub use pool::manager::{LoadEvent, PoolOptions, ProgressFn};
pub use pool::state::{InstanceState, InstanceStats, InstanceStatus, PoolStatus};

/// Resident set size of this process in bytes (Linux), for memory reports.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
