//! Importing a whole conversation: checked, embedded in batches, stored all
//! or nothing, indexed like any other.

use std::sync::Arc;

use crate::chat::turn::ChatCore;
use crate::chat::types::ChatError;
use crate::memory::store::{Conversation, NewMessage, StoredMessage};
use crate::params::Role;

/// One message of a conversation being imported.
#[derive(Clone, Debug)]
pub struct ImportMessage {
    pub role: Role,
    pub content: String,
    /// When it was written (milliseconds since the epoch); default: now.
    pub created_at_ms: Option<u64>,
}

/// Most messages one imported conversation may have.
pub const MAX_IMPORT_MESSAGES: usize = 10_000;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// The latest `created_at` an imported message may have: the last
/// millisecond of the year 9999 (a store keeps it as a signed 64-bit number).
pub const MAX_CREATED_AT_MS: u64 = 253_402_300_799_999;
/// Texts embedded together while importing.
const IMPORT_EMBED_BATCH: usize = 64;

impl ChatCore {
    /// Every rule an imported conversation must meet (message count, roles,
    /// content, title), checked before anything of it is stored.
    pub(crate) fn check_import(&self, title: Option<&str>, messages: &[ImportMessage]) -> Result<(), ChatError> {
        let invalid = |field, rule, value: String| Err(ChatError::InvalidInput { field, rule, value });
        if messages.is_empty() || messages.len() > MAX_IMPORT_MESSAGES {
            return invalid(
                "messages",
                "must hold between 1 and 10000 messages",
                format!("{} messages", messages.len()),
            );
        }
        if let Some(t) = title {
            if t.chars().count() > MAX_TITLE_CHARS {
                return invalid("title", "is longer than 200 characters", format!("{} characters", t.chars().count()));
            }
            if let Some(at) = t.chars().position(|c| c == '\0') {
                return invalid(
                    "title",
                    "must not contain the character U+0000 (NUL)",
                    format!("U+0000 at character {at}"),
                );
            }
        }
        for (i, m) in messages.iter().enumerate() {
            if let Some(at) = m.created_at_ms.filter(|at| *at > MAX_CREATED_AT_MS) {
                return invalid(
                    "messages",
                    "created_at must be at most 253402300799999 (milliseconds since the epoch: the year 9999)",
                    format!("message {i} has created_at {at}"),
                );
            }
            if m.role == Role::System {
                return invalid("messages", "roles must be user or assistant", format!("message {i} has role system"));
            }
            self.validate(&m.content).map_err(|e| match e {
                ChatError::InvalidInput { rule, value, .. } => {
                    ChatError::InvalidInput { field: "messages", rule, value: format!("message {i}: {value}") }
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// Stores a whole conversation at once (all or nothing) with its
    /// messages' embeddings, and indexes them: its messages are recalled like
    /// any others.
    pub(crate) async fn import(
        self: &Arc<Self>,
        namespace: &str,
        title: Option<String>,
        messages: Vec<ImportMessage>,
    ) -> Result<(Conversation, Vec<StoredMessage>), ChatError> {
        self.check_import(title.as_deref(), &messages)?;
        let mut vectors = Vec::with_capacity(messages.len());
        for batch in messages.chunks(IMPORT_EMBED_BATCH) {
            let texts = batch.iter().map(|m| m.content.clone()).collect();
            vectors.extend(self.embedder.embed(texts).await.map_err(ChatError::Embedding)?);
        }
        let engine = self.pool.engine().clone();
        let texts: Vec<String> = messages.iter().map(|m| m.content.clone()).collect();
        let counts: Vec<u32> =
            actix_web::rt::task::spawn_blocking(move || texts.iter().map(|t| engine.count_tokens(t)).collect())
                .await
                .map_err(|_| ChatError::Internal("counting tokens panicked".into()))?;
        let mut conv = Conversation::new(namespace);
        conv.title = title;
        let now = conv.created_at_ms;
        let new: Vec<NewMessage> = messages
            .into_iter()
            .zip(vectors)
            .zip(counts)
            .map(|((m, vector), token_count)| NewMessage {
                role: m.role,
                content: m.content,
                created_at_ms: m.created_at_ms.unwrap_or(now),
                token_count,
                vector,
            })
            .collect();
        let vectors: Vec<Vec<f32>> = new.iter().map(|m| m.vector.clone()).collect();
        let stored = self.store.import(&conv, new).await?;
        // Recall in the conversation loads it from the store on first use;
        // the namespace index (cross-conversation recall) takes it now.
        let items = stored.iter().zip(vectors).map(|(m, v)| (m.id, conv.id, v)).collect();
        let (index, ns) = (self.index.clone(), conv.namespace.clone());
        actix_web::rt::task::spawn_blocking(move || index.insert_namespace(items, &ns))
            .await
            .map_err(|_| ChatError::Internal("indexing the imported messages panicked".into()))?;
        Ok((conv, stored))
    }
}
