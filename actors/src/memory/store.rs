//! Conversations and messages in sled. Keys give ordered per-conversation
//! scans: `messages` is keyed by conversation id (16 bytes) + message id (8
//! bytes, big-endian, from sled's monotonic id generator). Each message's
//! embedding sits in `vectors` under its message id, so the vector index can
//! be rebuilt from sled, the source of truth.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use uuid::Uuid;

use crate::params::Role;

pub type ConversationId = Uuid;

/// When a write is acknowledged.
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
    Locked { dir: PathBuf },
    #[error("data directory {dir}: {message}")]
    Open { dir: PathBuf, message: String },
    #[error("conversation {0} not found")]
    NotFound(ConversationId),
    #[error("storage error: {0}")]
    Sled(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

/// A conversation's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: ConversationId,
    /// The user or tenant it belongs to; cross-conversation recall stays inside it.
    pub namespace: String,
    pub created_at_ms: u64,
}

/// One stored message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: u64,
    pub conversation_id: ConversationId,
    pub role: Role,
    pub content: String,
    pub created_at_ms: u64,
    pub token_count: u32,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn msg_key(conv: &ConversationId, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(conv.as_bytes());
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

fn encode_vector(conv: &ConversationId, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + v.len() * 4);
    out.extend_from_slice(conv.as_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The durable store of conversations, messages and their vectors.
#[derive(Clone)]
pub struct ConversationStore {
    db: sled::Db,
    conversations: sled::Tree,
    messages: sled::Tree,
    vectors: sled::Tree,
    durability: Durability,
    /// The last write error, until a write succeeds again. sled keeps an I/O
    /// error (disk full) until the database is reopened, so in practice this
    /// stays set until the process restarts.
    write_error: Arc<Mutex<Option<String>>>,
}

impl ConversationStore {
    /// Opens (or creates) the store in `dir`. A directory held by another
    /// running process gives [`StoreError::Locked`].
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        let open_err = |message: String| StoreError::Open { dir: dir.to_path_buf(), message };
        std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create it ({e})")))?;
        let db = sled::Config::new().path(dir.join("sled")).open().map_err(|e| {
            let text = e.to_string();
            if text.contains("could not acquire lock") || text.contains("WouldBlock") {
                StoreError::Locked { dir: dir.to_path_buf() }
            } else {
                open_err(text)
            }
        })?;
        Ok(Self {
            conversations: db.open_tree("conversations")?,
            messages: db.open_tree("messages")?,
            vectors: db.open_tree("vectors")?,
            db,
            durability,
            write_error: Arc::default(),
        })
    }

    /// Why the store cannot write, if its last write failed.
    pub fn write_error(&self) -> Option<String> {
        self.write_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the outcome of a write for [`Self::write_error`].
    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let mut slot = self.write_error.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => *slot = None,
            Err(e @ StoreError::Sled(_)) => {
                if slot.is_none() {
                    tracing::error!(error = %e, "the conversation store cannot write");
                }
                *slot = Some(e.to_string());
            }
            Err(_) => {}
        }
        result
    }

    async fn commit(&self) -> Result<(), StoreError> {
        if self.durability == Durability::Sync {
            self.db.flush_async().await?;
        }
        Ok(())
    }

    /// A new conversation, not stored yet: it is stored with its first message
    /// ([`Self::append`] with `new_conversation`), so a turn refused before that leaves no trace.
    pub fn new_conversation(&self, namespace: &str) -> Conversation {
        Conversation { id: Uuid::new_v4(), namespace: namespace.to_string(), created_at_ms: now_ms() }
    }

    pub fn conversation(&self, id: &ConversationId) -> Result<Conversation, StoreError> {
        match self.conversations.get(id.as_bytes())? {
            Some(bytes) => decode(&bytes),
            None => Err(StoreError::NotFound(*id)),
        }
    }

    pub fn list_conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        self.conversations.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Stores a message and its embedding atomically; returns once durable
    /// (with [`Durability::Sync`]). The conversation must exist, unless
    /// `new_conversation` says it is stored now, with this first message.
    pub async fn append(
        &self,
        conv: &Conversation,
        new_conversation: bool,
        role: Role,
        content: &str,
        token_count: u32,
        vector: &[f32],
    ) -> Result<StoredMessage, StoreError> {
        let r = self.store_message(conv, new_conversation, role, content, token_count, vector).await;
        self.noted(r)
    }

    async fn store_message(
        &self,
        conv: &Conversation,
        create: bool,
        role: Role,
        content: &str,
        token_count: u32,
        vector: &[f32],
    ) -> Result<StoredMessage, StoreError> {
        let msg = StoredMessage {
            id: self.db.generate_id()?,
            conversation_id: conv.id,
            role,
            content: content.to_string(),
            created_at_ms: now_ms(),
            token_count,
        };
        let key = msg_key(&conv.id, msg.id);
        let value = serde_json::to_vec(&msg).expect("serialisable");
        let vector = encode_vector(&conv.id, vector);
        let record = serde_json::to_vec(conv).expect("serialisable");
        (&self.conversations, &self.messages, &self.vectors)
            .transaction(|(c, m, v)| {
                if create {
                    c.insert(conv.id.as_bytes(), record.as_slice())?;
                } else if c.get(conv.id.as_bytes())?.is_none() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                m.insert(&key[..], value.as_slice())?;
                v.insert(&msg.id.to_be_bytes()[..], vector.as_slice())?;
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::NotFound(conv.id),
                TransactionError::Storage(e) => e.into(),
            })?;
        self.commit().await?;
        Ok(msg)
    }

    /// A page of a conversation's messages in order, after message id `after`.
    pub fn messages(
        &self,
        conv: &ConversationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let start = msg_key(conv, after.map(|a| a.saturating_add(1)).unwrap_or(0));
        let end = msg_key(conv, u64::MAX);
        self.messages.range(start..=end).values().take(limit).map(|v| decode(&v?)).collect()
    }

    /// Number of messages in a conversation.
    pub fn count(&self, conv: &ConversationId) -> Result<usize, StoreError> {
        let mut n = 0;
        for key in self.messages.scan_prefix(conv.as_bytes()).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    /// The last `n` messages, oldest first.
    pub fn recent(&self, conv: &ConversationId, n: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out: Vec<StoredMessage> = self
            .messages
            .scan_prefix(conv.as_bytes())
            .values()
            .rev()
            .take(n)
            .map(|v| decode(&v?))
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    pub fn message(&self, conv: &ConversationId, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        self.messages.get(msg_key(conv, id))?.map(|v| decode(&v)).transpose()
    }

    /// Deletes a conversation, its messages and their vectors; returns the
    /// ids of the deleted messages.
    pub async fn delete_conversation(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        self.conversation(conv)?;
        let r = self.delete_inner(conv).await;
        self.noted(r)
    }

    async fn delete_inner(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        let keys: Vec<sled::IVec> = self.messages.scan_prefix(conv.as_bytes()).keys().collect::<Result<_, _>>()?;
        let ids: Vec<u64> =
            keys.iter().map(|k| u64::from_be_bytes(k[16..24].try_into().expect("24-byte key"))).collect();
        (&self.conversations, &self.messages, &self.vectors)
            .transaction(|(c, m, v)| {
                for (k, id) in keys.iter().zip(&ids) {
                    m.remove(k)?;
                    v.remove(&id.to_be_bytes()[..])?;
                }
                c.remove(conv.as_bytes())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::NotFound(*conv),
                TransactionError::Storage(e) => e.into(),
            })?;
        self.db.flush_async().await?;
        Ok(ids)
    }

    /// Every stored vector: (message id, conversation id, vector).
    pub fn vectors(&self) -> impl Iterator<Item = Result<(u64, ConversationId, Vec<f32>), StoreError>> + '_ {
        self.vectors.iter().map(|r| {
            let (k, v) = r?;
            if k.len() != 8 || v.len() < 16 || (v.len() - 16) % 4 != 0 {
                return Err(StoreError::Corrupt("vector record".into()));
            }
            let id = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
            let conv = Uuid::from_slice(&v[..16]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let vec = v[16..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
            Ok((id, conv, vec))
        })
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let r = self.db.flush_async().await.map(|_| ()).map_err(StoreError::from);
        self.noted(r)
    }
}
