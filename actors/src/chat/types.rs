//! What a chat turn takes and gives: its options, its message, its reply,
//! its stream of events and its errors.

use serde::Serialize;

use crate::error::{EngineError, PoolError};
use crate::memory::index::IndexOptions;
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::{ConversationId, StoreError};
use crate::params::{ChatMessage, FinishReason, SamplingParams, Usage};

/// Settings of the chat layer.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    pub system_prompt: String,
    /// Most recent messages always considered for the prompt.
    pub recent_messages: usize,
    /// Earlier messages recalled by meaning per turn.
    pub recall_k: usize,
    /// Least cosine similarity for a message to be recalled.
    pub recall_min_score: f32,
    /// Recall from every conversation of the namespace, not only the current one.
    pub cross_conversation: bool,
    /// Longest user message, in characters.
    pub max_message_chars: usize,
    pub sampling: SamplingParams,
    /// The vector index (its `namespaces` follows `cross_conversation`).
    pub index: IndexOptions,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            system_prompt: "You are a helpful assistant.".into(),
            recent_messages: 16,
            recall_k: 3,
            recall_min_score: 0.25,
            cross_conversation: false,
            max_message_chars: 16_000,
            sampling: SamplingParams::default(),
            index: IndexOptions::default(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    #[error("conversation {0} not found")]
    NotFound(ConversationId),
    #[error("invalid {field}: {rule}, got {value}")]
    InvalidInput { field: &'static str, rule: &'static str, value: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("embedding: {0}")]
    Embedding(EngineError),
    /// The store could not read or write (I/O error, disk full).
    #[error("storage: {0}")]
    Store(String),
    /// The reader took nothing for the pause limit: the reply was cut and
    /// nothing of the turn was stored.
    #[error("the reply was cut: the client read nothing for the pause limit (max_pause_ms); nothing of this turn was stored")]
    ReplyCut,
    /// The chat layer has stopped (shutting down).
    #[error("the chat layer has stopped")]
    Stopped,
    /// A turn ended in a way that is a bug, not the client's or the store's doing.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ChatError::NotFound(id),
            other => ChatError::Store(other.to_string()),
        }
    }
}

impl From<EngineError> for ChatError {
    fn from(e: EngineError) -> Self {
        ChatError::Pool(PoolError::Engine(e))
    }
}

/// The result of one turn.
#[derive(Clone, Debug, Serialize)]
pub struct ChatReply {
    pub conversation_id: ConversationId,
    pub user_message_id: u64,
    pub message_id: u64,
    pub reply: String,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    pub recalled: Vec<Recalled>,
    /// The prompt the model saw.
    #[serde(skip)]
    pub prompt: Vec<ChatMessage>,
    /// The model instance that generated the reply.
    pub instance: usize,
    /// The sequence slot of that instance (its KV cache holds this conversation).
    pub slot: usize,
    /// Time this turn waited on the conversation store (every read and both
    /// appends), in milliseconds.
    pub store_ms: f64,
    /// Time this turn spent on memory work on the answer's path: embedding
    /// the message, recall, building the prompt, and the store calls before
    /// the reply was sent (not the wait for an instance, not generation), in
    /// milliseconds. The reply's embedding is made after the answer; a turn
    /// that arrives while it is being made waits for it, and that wait counts.
    pub memory_ms: f64,
}

/// What a turn's stream yields: text pieces, then one `Done` or `Error`.
#[derive(Clone, Debug)]
pub enum ChatEvent {
    Token(String),
    Done(Box<ChatReply>),
    Error(ChatError),
}

/// Sends a user message; starts a new conversation when `conversation_id` is none.
#[derive(Clone, Debug)]
pub struct SendMessage {
    pub conversation_id: Option<ConversationId>,
    /// Namespace (user or tenant) of a new conversation.
    pub namespace: Option<String>,
    pub text: String,
    /// Sampling for this turn; none uses the configured defaults.
    pub sampling: Option<SamplingParams>,
    /// Who asks, for the pool's per-client share; none: not counted.
    pub client: Option<u64>,
}
