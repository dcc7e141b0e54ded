//! One error enum per layer: the engine (llama.cpp) and the pool.

use std::path::PathBuf;

/// Errors of the inference engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    #[error("model file {path} could not be loaded by llama.cpp (corrupt or unsupported GGUF)")]
    ModelLoad { path: PathBuf },
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("could not create a llama.cpp context: {0}")]
    Context(String),
    #[error("invalid {field}: {rule}, got {value}")]
    InvalidParam { field: &'static str, rule: &'static str, value: String },
    /// A request field outside a bound whose name, rule or value is only
    /// known at run time (`tools[3].function.parameters`); `message` names all three.
    #[error("{message}")]
    Refused { field: String, message: String },
    /// Every grammar parser thread is busy (some may be past their budget).
    #[error("every grammar parser thread is busy ({limit} at once); retry shortly")]
    ParserBusy { limit: usize },
    #[error("prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: together {total} exceed the context size n_ctx={n_ctx}")]
    PromptTooLong { prompt_tokens: u32, max_tokens: u32, total: u32, n_ctx: u32 },
    #[error("chat template: {0}")]
    Template(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("{0}")]
    Embed(String),
    /// The embedder's queue holds its limit of texts: retry later.
    #[error("the embedder's queue is full ({max_queued} texts waiting, the limit of embed_queue); retry after 1 s")]
    EmbedQueueFull { max_queued: usize },
    #[error("input[{index}] is {tokens} tokens, more than the embedding model's limit of {limit} tokens")]
    InputTooLong { index: usize, tokens: usize, limit: usize },
    /// A remote instance failed (unreachable, silent, a 5xx, a broken stream):
    /// it is marked unhealthy and reconnected with back-off.
    #[error("{0}")]
    Remote(String),
    /// A remote instance refused one request (a 4xx); the remote is fine.
    #[error("{0}")]
    RemoteRejected(String),
    /// A remote serves another model than the pool's: a start-up error.
    #[error("{0}")]
    RemoteModel(String),
    /// A remote instance could not be set up here (bad URL, no runtime).
    #[error("{0}")]
    RemoteSetup(String),
}

impl EngineError {
    /// True when the error says the instance itself is broken (and should be
    /// replaced), false when the request was at fault.
    pub fn is_instance_fault(&self) -> bool {
        matches!(
            self,
            EngineError::Decode(_) | EngineError::Context(_) | EngineError::Backend(_) | EngineError::Remote(_)
        )
    }
}

/// Errors of the pool: admission, leases and instance health.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("no model instance became free within the acquire timeout of {timeout_ms} ms")]
    AcquireTimeout { timeout_ms: u64 },
    #[error("the request queue is full ({max_queue} waiting); retry later")]
    QueueFull { max_queue: usize },
    #[error("the pool is shutting down")]
    ShuttingDown,
    /// One client's share of the slots and queue places is taken.
    #[error("this client already has {limit} requests running or queued, its share of the pool (max_concurrent_per_key); retry when one ends")]
    ClientLimit { limit: usize },
    #[error("model instance {instance} failed during the request: {reason}")]
    InstanceFailed { instance: usize, reason: String },
    #[error("generation exceeded max_generation_ms ({limit_ms} ms) and was stopped")]
    GenerationTimeout { limit_ms: u64 },
    #[error("pool start-up failed: {0}")]
    Startup(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}
