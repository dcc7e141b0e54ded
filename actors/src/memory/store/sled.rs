//! Conversations and messages in sled. Keys give ordered per-conversation
//! scans: `messages` is keyed by conversation id (16 bytes) + message id (8
//! bytes, big-endian, from sled's monotonic id generator). Each message's
//! embedding sits in `conversation_vectors` under the same key, so that one
//! conversation's vectors are one prefix scan (the vector index loads a
//! conversation on first use). Stores written before kept vectors in
//! `vectors` under the message id alone; opening one moves them over once.
//! Reads that scan run on a blocking thread, not on the caller's executor.

use std::path::Path;
use std::sync::{Arc, Mutex};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use uuid::Uuid;

use super::{Conversation, ConversationId, Durability, NewMessage, Store, StoreError, StoredMessage, StoredVector};

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

fn msg_key(conv: &ConversationId, id: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(conv.as_bytes());
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

/// A conversation's key in the per-namespace listing tree.
fn listing_key(c: &Conversation) -> Vec<u8> {
    let mut k = Vec::with_capacity(c.namespace.len() + 25);
    k.extend_from_slice(c.namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(&newest_key(c));
    k
}

/// A conversation's key in the listing tree over every namespace.
fn newest_key(c: &Conversation) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&c.created_at_ms.to_be_bytes());
    k[8..].copy_from_slice(c.id.as_bytes());
    k
}

fn encode_vector(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn decode<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The embedded store: sled in the data directory.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    conversations: sled::Tree,
    messages: sled::Tree,
    /// Embeddings keyed like `messages`.
    vectors: sled::Tree,
    /// Conversations in listing order: namespace, NUL, created_at_ms (8
    /// bytes, big-endian), id (16); empty values ([`listing_key`]).
    listing: sled::Tree,
    /// The same over every namespace: created_at_ms, id ([`newest_key`]).
    newest: sled::Tree,
    durability: Durability,
    dir: std::path::PathBuf,
    /// The last write error, until a write succeeds again. sled keeps an I/O
    /// error (disk full) until the database is reopened, so in practice this
    /// stays set until the process restarts.
    write_error: Arc<Mutex<Option<String>>>,
    /// One write (transaction + flush) at a time: sled 0.34 can deadlock
    /// when a multi-tree transaction starts while `flush_async` calls from
    /// other writers are in flight (seen with concurrent appends: every
    /// flusher parked on the concurrency-control lock).
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl SledStore {
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
        let had_listing = db.tree_names().iter().any(|n| n.as_ref() == b"conversation_listing");
        let store = Self {
            listing: db.open_tree("conversation_listing")?,
            newest: db.open_tree("conversation_newest")?,
            conversations: db.open_tree("conversations")?,
            messages: db.open_tree("messages")?,
            vectors: db.open_tree("conversation_vectors")?,
            db,
            durability,
            dir: dir.to_path_buf(),
            write_error: Arc::default(),
            writes: Arc::default(),
        };
        store.migrate_vectors()?;
        if !had_listing {
            store.build_listing()?;
        }
        Ok(store)
    }

    /// Indexes the conversations of a store written before the listing
    /// trees existed, once.
    fn build_listing(&self) -> Result<(), StoreError> {
        let mut n = 0usize;
        for v in self.conversations.iter().values() {
            let c: Conversation = decode(&v?)?;
            self.listing.insert(listing_key(&c), &[])?;
            self.newest.insert(newest_key(&c), &[])?;
            n += 1;
        }
        self.db.flush()?;
        if n > 0 {
            tracing::info!(conversations = n, "indexed the stored conversations for listing");
        }
        Ok(())
    }

    /// Moves vectors of the earlier layout (`vectors`, keyed by message id,
    /// the conversation id in the value) to `conversation_vectors`, once.
    fn migrate_vectors(&self) -> Result<(), StoreError> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == b"vectors") {
            return Ok(());
        }
        let old = self.db.open_tree("vectors")?;
        let mut moved = 0usize;
        for r in old.iter() {
            let (k, v) = r?;
            let (id, conv, vector) = decode_old_vector(&k, &v)?;
            self.vectors.insert(msg_key(&conv, id), encode_vector(&vector))?;
            moved += 1;
        }
        self.vectors.flush()?;
        self.db.drop_tree("vectors")?;
        self.db.flush()?;
        if moved > 0 {
            tracing::info!(vectors = moved, "moved stored vectors to the per-conversation layout");
        }
        Ok(())
    }

    /// Runs `f` on a blocking thread (sled calls block).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Sled(format!("a store task failed: {e}")))?
    }

    /// Records the outcome of a write for [`Store::health`].
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

    fn get_conversation(&self, id: &ConversationId) -> Result<Conversation, StoreError> {
        match self.conversations.get(id.as_bytes())? {
            Some(bytes) => decode(&bytes),
            None => Err(StoreError::NotFound(*id)),
        }
    }

    /// Stores `messages` of `conv` in one transaction and commits: the
    /// conversation record too when `create`, else it must exist.
    async fn write(
        &self,
        conv: &Conversation,
        create: bool,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let _one_writer = self.writes.lock().await;
        let mut stored = Vec::with_capacity(messages.len());
        let mut records = Vec::with_capacity(messages.len());
        for m in messages {
            let msg = StoredMessage {
                id: self.db.generate_id()?,
                conversation_id: conv.id,
                role: m.role,
                content: m.content,
                created_at_ms: m.created_at_ms,
                token_count: m.token_count,
            };
            let value = serde_json::to_vec(&msg).expect("serialisable");
            records.push((msg_key(&conv.id, msg.id), value, encode_vector(&m.vector)));
            stored.push(msg);
        }
        let record = serde_json::to_vec(conv).expect("serialisable");
        let (listed, newest) = (listing_key(conv), newest_key(conv));
        (&self.conversations, &self.messages, &self.vectors, &self.listing, &self.newest)
            .transaction(|(c, m, v, l, n)| {
                if create {
                    c.insert(conv.id.as_bytes(), record.as_slice())?;
                    l.insert(listed.as_slice(), &[])?;
                    n.insert(newest.as_slice(), &[])?;
                } else if c.get(conv.id.as_bytes())?.is_none() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                for (key, value, vector) in &records {
                    m.insert(&key[..], value.as_slice())?;
                    if !vector.is_empty() {
                        v.insert(&key[..], vector.as_slice())?;
                    }
                }
                Ok(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::NotFound(conv.id),
                TransactionError::Storage(e) => e.into(),
            })?;
        self.commit().await?;
        Ok(stored)
    }

    async fn delete_inner(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        let _one_writer = self.writes.lock().await;
        let keys: Vec<sled::IVec> = self.messages.scan_prefix(conv.as_bytes()).keys().collect::<Result<_, _>>()?;
        // A message key is the conversation id (16 bytes) and the message id
        // (8); a key of another length is not a message and is skipped.
        let ids: Vec<u64> =
            keys.iter().filter_map(|k| k.get(16..24)?.try_into().ok()).map(u64::from_be_bytes).collect();
        let listed = match self.conversations.get(conv.as_bytes())? {
            Some(bytes) => {
                let c: Conversation = decode(&bytes)?;
                Some((listing_key(&c), newest_key(&c)))
            }
            None => None,
        };
        (&self.conversations, &self.messages, &self.vectors, &self.listing, &self.newest)
            .transaction(|(c, m, v, l, n)| {
                for k in &keys {
                    m.remove(k)?;
                    v.remove(k)?;
                }
                c.remove(conv.as_bytes())?;
                if let Some((listed, newest)) = &listed {
                    l.remove(listed.as_slice())?;
                    n.remove(newest.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::NotFound(*conv),
                TransactionError::Storage(e) => e.into(),
            })?;
        self.db.flush_async().await?;
        Ok(ids)
    }
}

fn decode_vector(k: &[u8], v: &[u8]) -> Result<StoredVector, StoreError> {
    if k.len() != 24 || !v.len().is_multiple_of(4) {
        return Err(StoreError::Corrupt("vector record".into()));
    }
    let conv = Uuid::from_slice(&k[..16]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let id = u64::from_be_bytes(k[16..24].try_into().expect("8 bytes"));
    let vec = v.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok((id, conv, vec))
}

/// A vector record of the earlier layout: message id key, conversation id + floats value.
fn decode_old_vector(k: &[u8], v: &[u8]) -> Result<StoredVector, StoreError> {
    if k.len() != 8 || v.len() < 16 || !(v.len() - 16).is_multiple_of(4) {
        return Err(StoreError::Corrupt("vector record".into()));
    }
    let id = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let conv = Uuid::from_slice(&v[..16]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let vec = v[16..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok((id, conv, vec))
}

#[async_trait::async_trait]
impl Store for SledStore {
    fn describe(&self) -> String {
        format!("sled at {}", self.dir.display())
    }

    fn shared(&self) -> bool {
        false
    }

    async fn conversation(&self, id: &ConversationId) -> Result<Conversation, StoreError> {
        self.get_conversation(id)
    }

    async fn list_conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        self.blocking(|s| s.conversations.iter().values().map(|v| decode(&v?)).collect()).await
    }

    async fn conversations_page(
        &self,
        namespace: Option<&str>,
        before: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<Vec<Conversation>, StoreError> {
        let prefix: Vec<u8> = match namespace {
            Some(ns) => [ns.as_bytes(), &[0]].concat(),
            None => Vec::new(),
        };
        let by_namespace = namespace.is_some();
        self.blocking(move |s| {
            let tree = if by_namespace { &s.listing } else { &s.newest };
            let mut end = prefix.clone();
            match before {
                Some((ms, id)) => {
                    end.extend_from_slice(&ms.to_be_bytes());
                    end.extend_from_slice(id.as_bytes());
                }
                // Past every key of the prefix (keys after it are 24 bytes).
                None => end.extend_from_slice(&[0xff; 25]),
            }
            let mut page = Vec::with_capacity(limit.min(1024));
            for key in tree.range(prefix.clone()..end).keys().rev() {
                if page.len() >= limit {
                    break;
                }
                let key = key?;
                let Some(id) = key.get(key.len().saturating_sub(16)..).and_then(|b| Uuid::from_slice(b).ok()) else {
                    continue;
                };
                // Deleted between the index read and this one: left out.
                if let Some(bytes) = s.conversations.get(id.as_bytes())? {
                    page.push(decode(&bytes)?);
                }
            }
            Ok(page)
        })
        .await
    }

    async fn append_messages(
        &self,
        conv: &Conversation,
        new_conversation: bool,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let r = self.write(conv, new_conversation, messages).await;
        self.noted(r)
    }

    async fn import(&self, conv: &Conversation, messages: Vec<NewMessage>) -> Result<Vec<StoredMessage>, StoreError> {
        let r = self.write(conv, true, messages).await;
        self.noted(r)
    }

    async fn messages(
        &self,
        conv: &ConversationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let start = msg_key(conv, after.map(|a| a.saturating_add(1)).unwrap_or(0));
        let end = msg_key(conv, u64::MAX);
        self.blocking(move |s| s.messages.range(start..=end).values().take(limit).map(|v| decode(&v?)).collect()).await
    }

    async fn count(&self, conv: &ConversationId) -> Result<usize, StoreError> {
        let conv = *conv;
        self.blocking(move |s| {
            let mut n = 0;
            for key in s.messages.scan_prefix(conv.as_bytes()).keys() {
                key?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    async fn recent(&self, conv: &ConversationId, n: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let conv = *conv;
        self.blocking(move |s| {
            let mut out: Vec<StoredMessage> = s
                .messages
                .scan_prefix(conv.as_bytes())
                .values()
                .rev()
                .take(n)
                .map(|v| decode(&v?))
                .collect::<Result<_, _>>()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    async fn messages_by_id(&self, ids: &[(ConversationId, u64)]) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for (conv, id) in ids {
            if let Some(v) = self.messages.get(msg_key(conv, *id))? {
                out.push(decode(&v)?);
            }
        }
        Ok(out)
    }

    async fn delete_conversation(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        self.get_conversation(conv)?;
        let r = self.delete_inner(conv).await;
        self.noted(r)
    }

    async fn vectors(&self, conv: Option<&ConversationId>) -> Result<Vec<StoredVector>, StoreError> {
        let conv = conv.copied();
        self.blocking(move |s| {
            let iter = match conv {
                Some(c) => s.vectors.scan_prefix(c.as_bytes()),
                None => s.vectors.iter(),
            };
            iter.map(|r| {
                let (k, v) = r?;
                decode_vector(&k, &v)
            })
            .collect()
        })
        .await
    }

    async fn set_vector(&self, conv: &ConversationId, id: u64, vector: &[f32]) -> Result<bool, StoreError> {
        let _one_writer = self.writes.lock().await;
        let (key, value) = (msg_key(conv, id), encode_vector(vector));
        let r = (&self.messages, &self.vectors)
            .transaction(|(m, v)| {
                if m.get(&key[..])?.is_none() {
                    return Ok(false);
                }
                v.insert(&key[..], value.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(true)
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::NotFound(*conv),
                TransactionError::Storage(e) => e.into(),
            });
        let r = match r {
            Ok(true) => self.commit().await.map(|_| true),
            other => other,
        };
        self.noted(r)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _one_writer = self.writes.lock().await;
        let r = self.db.flush_async().await.map(|_| ()).map_err(StoreError::from);
        self.noted(r)
    }

    fn health(&self) -> Option<String> {
        self.write_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn check(&self) -> Option<String> {
        self.health()
    }
}
