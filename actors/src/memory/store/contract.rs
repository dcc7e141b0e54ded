//! What every conversation store is and keeps: the [`Store`] trait, the
//! records it stores (conversations, messages, vectors) and its errors.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::params::Role;

pub type ConversationId = Uuid;

/// When a write to the sled store is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After it is flushed to disk (survives a crash).
    Sync,
    /// At once; sled flushes in the background every 500 ms, so a crash can
    /// lose the last half second of messages. Faster.
    Async,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir} is in use by another modelpool process (its lock is held)")]
    Locked { dir: std::path::PathBuf },
    #[error("data directory {dir}: {message}")]
    Open { dir: std::path::PathBuf, message: String },
    #[error("conversation {0} not found")]
    NotFound(ConversationId),
    #[error("storage error: {0}")]
    Sled(String),
    /// The database cannot be reached (or stopped answering): retry later.
    #[error("the conversation store {store} is unavailable: {cause}")]
    Unavailable { store: String, cause: String },
    #[error("the conversation store {store} failed: {cause}")]
    Database { store: String, cause: String },
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// A conversation's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: ConversationId,
    /// The user or tenant it belongs to; cross-conversation recall stays inside it.
    pub namespace: String,
    pub created_at_ms: u64,
    /// A title given at import; otherwise the first message serves as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

impl Conversation {
    /// A new conversation, not stored yet: it is stored with its first message
    /// ([`Store::append`] with `new_conversation`), so a turn refused before that leaves no trace.
    pub fn new(namespace: &str) -> Self {
        Conversation { id: Uuid::new_v4(), namespace: namespace.to_string(), created_at_ms: now_ms(), title: None }
    }
}

/// One stored message. `id` is unique in the store (and the payload of the
/// vector index); within a conversation, ids grow in the conversation's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredMessage {
    pub id: u64,
    #[schema(value_type = String, format = Uuid)]
    pub conversation_id: ConversationId,
    pub role: Role,
    pub content: String,
    pub created_at_ms: u64,
    pub token_count: u32,
}

/// A message to import, with everything the store keeps of it.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub role: Role,
    pub content: String,
    pub created_at_ms: u64,
    pub token_count: u32,
    pub vector: Vec<f32>,
}

impl NewMessage {
    /// A message written now.
    pub fn now(role: Role, content: &str, token_count: u32, vector: Vec<f32>) -> Self {
        Self { role, content: content.to_string(), created_at_ms: now_ms(), token_count, vector }
    }
}

/// A stored vector: (message id, conversation id, vector).
pub type StoredVector = (u64, ConversationId, Vec<f32>);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a conversation store does. Every call may wait on I/O; none blocks
/// the calling executor for long (sled answers from its cache, PostgreSQL
/// runs on a runtime of its own).
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Where it keeps its data, fit for logs (no password).
    fn describe(&self) -> String;

    /// Whether other processes write to it too (then the vector index of
    /// this process is a cache that a conversation's turn brings up to date).
    fn shared(&self) -> bool;

    async fn conversation(&self, id: &ConversationId) -> Result<Conversation, StoreError>;

    async fn list_conversations(&self) -> Result<Vec<Conversation>, StoreError>;

    /// A page of conversations, newest first (ties by id, highest first):
    /// those of `namespace` (every namespace when none) created before the
    /// cursor `before` = (created_at_ms, id). Reads about `limit` records,
    /// not the whole store.
    async fn conversations_page(
        &self,
        namespace: Option<&str>,
        before: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<Vec<Conversation>, StoreError>;

    /// Stores messages with their embeddings (none when a vector is empty,
    /// see [`Self::set_vector`]) after the conversation's last, in order, all
    /// or nothing; returns once committed. The conversation must exist,
    /// unless `new_conversation` says it is stored now, with these messages.
    /// A turn stores its user message and its reply together.
    async fn append_messages(
        &self,
        conv: &Conversation,
        new_conversation: bool,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// [`Self::append_messages`] of one message.
    async fn append(
        &self,
        conv: &Conversation,
        new_conversation: bool,
        role: Role,
        content: &str,
        token_count: u32,
        vector: &[f32],
    ) -> Result<StoredMessage, StoreError> {
        let message = NewMessage::now(role, content, token_count, vector.to_vec());
        let mut stored = self.append_messages(conv, new_conversation, vec![message]).await?;
        stored.pop().ok_or_else(|| StoreError::Corrupt("an append stored no message".into()))
    }

    /// Stores a new conversation with all its messages, in order, at once:
    /// all or nothing.
    async fn import(&self, conv: &Conversation, messages: Vec<NewMessage>) -> Result<Vec<StoredMessage>, StoreError>;

    /// A page of a conversation's messages in order, after message id `after`.
    async fn messages(
        &self,
        conv: &ConversationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Number of messages in a conversation.
    async fn count(&self, conv: &ConversationId) -> Result<usize, StoreError>;

    /// The last `n` messages, oldest first.
    async fn recent(&self, conv: &ConversationId, n: usize) -> Result<Vec<StoredMessage>, StoreError>;

    /// The messages with these ids, in no particular order; missing ones
    /// (deleted meanwhile) are left out.
    async fn messages_by_id(&self, ids: &[(ConversationId, u64)]) -> Result<Vec<StoredMessage>, StoreError>;

    /// Deletes a conversation, its messages and their vectors; returns the
    /// ids of the deleted messages.
    async fn delete_conversation(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError>;

    /// Sets the embedding of a stored message (a reply's embedding is made
    /// after the reply is stored). False when the message is gone.
    async fn set_vector(&self, conv: &ConversationId, id: u64, vector: &[f32]) -> Result<bool, StoreError>;

    /// Every stored vector, or one conversation's (messages without one are left out).
    async fn vectors(&self, conv: Option<&ConversationId>) -> Result<Vec<StoredVector>, StoreError>;

    /// The store's clock in milliseconds, as [`Self::namespace_vectors_since`]
    /// reads it. Only a shared store keeps one (0 otherwise).
    async fn clock_ms(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The vectors of `namespace` stored at or after `since_ms` by the
    /// store's clock, whoever stored them (a replica with namespace recall
    /// reads what other replicas added), and the store's clock when read. A
    /// store no other process writes to has nothing to add.
    async fn namespace_vectors_since(
        &self,
        namespace: &str,
        since_ms: u64,
    ) -> Result<(Vec<StoredVector>, u64), StoreError> {
        let _ = (namespace, since_ms);
        Ok((Vec::new(), 0))
    }

    /// Makes every acknowledged write durable (sled with `durability = "async"`).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Why the store cannot serve, as last seen; `None` when its last call worked.
    fn health(&self) -> Option<String>;

    /// Asks the store now (a cheap round trip for PostgreSQL) and updates [`Self::health`].
    async fn check(&self) -> Option<String>;
}

/// A shared handle on whichever store is configured.
pub type ConversationStore = Arc<dyn Store>;
