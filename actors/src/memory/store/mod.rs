//! The conversation store: conversations, their messages in exact order, and
//! each message's embedding. One trait, two implementations: sled in the data
//! directory (the embedded default, nothing to start) and PostgreSQL (the
//! shared store when several replicas serve the same conversations).
//!
//! Guarantees of both: a message is committed before `append` returns (with
//! sled's `durability = "sync"`); order within a conversation is exact under
//! concurrent turns; deleting a conversation deletes its messages' vectors.

use std::path::Path;
use std::sync::Arc;

mod contract;
pub mod postgres;
pub mod sled;

pub use self::contract::{
    Conversation, ConversationId, ConversationStore, Durability, NewMessage, Store, StoreError, StoredMessage,
    StoredVector,
};
pub use self::postgres::PostgresStore;
pub use self::sled::SledStore;

/// Where conversations are kept.
#[derive(Clone)]
pub enum StoreSpec {
    /// sled in `<data_dir>/sled`.
    Sled { data_dir: std::path::PathBuf, durability: Durability },
    /// PostgreSQL at this URL (`postgres://user:password@host:port/db`).
    Postgres { url: String },
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Sled { data_dir, durability } => {
                write!(f, "sled at {} ({durability:?})", data_dir.display())
            }
            StoreSpec::Postgres { url } => write!(f, "{}", postgres::redact(url)),
        }
    }
}

/// Opens the configured store (for PostgreSQL: connects and runs the
/// embedded migrations).
pub async fn open(spec: &StoreSpec) -> Result<ConversationStore, StoreError> {
    Ok(match spec {
        StoreSpec::Sled { data_dir, durability } => Arc::new(SledStore::open(data_dir, *durability)?),
        StoreSpec::Postgres { url } => Arc::new(PostgresStore::connect(url).await?),
    })
}

/// Opens the sled store in `dir`.
pub fn open_sled(dir: &Path, durability: Durability) -> Result<ConversationStore, StoreError> {
    Ok(Arc::new(SledStore::open(dir, durability)?))
}
