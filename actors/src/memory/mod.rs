//! Chat memory: conversations in a store (sled or PostgreSQL), an embedder, an HNSW index over the
//! stored vectors, and the prompt builder.

pub mod embedder;
pub mod index;
pub mod prompt_builder;
pub mod store;

pub use embedder::{EmbedderHandle, EmbedderOptions, Priority};
pub use index::{IndexOptions, IndexStats, Scope, VectorIndex};
pub use prompt_builder::{BuiltPrompt, PromptBudget, Recalled};
pub use store::{
    Conversation, ConversationId, ConversationStore, Durability, NewMessage, PostgresStore, SledStore, Store,
    StoreError, StoreSpec, StoredMessage,
};
