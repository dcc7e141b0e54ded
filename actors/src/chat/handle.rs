//! The chat layer as callers see it: a cloneable handle over the chat actor.
//! Turns, deletes and recalls go through the chat actor to their
//! conversation's actor; reads (history, listings) and imports go to the
//! store directly, as they need no order.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::chat::actor::{ChatActor, DeleteConversation, RecallIn, StartTurn, StopChat};
use crate::chat::import::ImportMessage;
use crate::chat::turn::{ChatCore, ChatParts, ChatStream, TurnRequest};
use crate::chat::types::{ChatError, ChatOptions, ChatReply, SendMessage};
use crate::memory::index::{IndexOptions, IndexStats, VectorIndex};
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::{Conversation, ConversationId, ConversationStore, Durability, StoredMessage};
use crate::memory::EmbedderHandle;
use crate::pool::handle::PoolHandle;

#[derive(Clone)]
pub struct ChatHandle {
    addr: Addr<ChatActor>,
    core: Arc<ChatCore>,
}

impl ChatHandle {
    /// Opens the sled store in `data_dir` and starts the chat layer on it
    /// ([`Self::start_on`]). Inside an actix system.
    pub async fn start(
        pool: PoolHandle,
        embedder: EmbedderHandle,
        data_dir: &Path,
        durability: Durability,
        opts: ChatOptions,
    ) -> Result<Self, ChatError> {
        let store = crate::memory::store::open_sled(data_dir, durability)?;
        let mut opts = opts;
        opts.index.graph_dir.get_or_insert_with(|| data_dir.join("graphs"));
        Self::start_on(pool, embedder, store, opts).await
    }

    /// Rebuilds the vector index from `store` and starts the chat actor.
    /// Inside an actix system.
    pub async fn start_on(
        pool: PoolHandle,
        embedder: EmbedderHandle,
        store: ConversationStore,
        opts: ChatOptions,
    ) -> Result<Self, ChatError> {
        let started = std::time::Instant::now();
        // What other replicas store from now on is read by later turns (namespace recall).
        let opened_at_ms = store.clock_ms().await?;
        let index_opts = IndexOptions {
            namespaces: opts.cross_conversation,
            model: format!("{} ({} dimensions)", embedder.model_name(), embedder.dim()),
            ..opts.index.clone()
        };
        let index = VectorIndex::open(&store, embedder.dim(), index_opts).await?;
        let stats = index.stats();
        tracing::info!(
            namespace_vectors = stats.namespace_vectors,
            building = stats.building,
            millis = started.elapsed().as_millis() as u64,
            "vector index opened"
        );
        // The chat actor and the conversations' actors run on an arbiter of
        // their own: the first half of every turn (reading the conversation,
        // embedding, recall, the prompt, the wait for an instance) runs on
        // that one thread, between awaits, never on the pool manager's or
        // the HTTP workers'; its blocking parts run on blocking threads. The
        // second half (the reply's tokens, storing it) runs where the
        // caller reads the stream. The arbiter stops with the last turn.
        let arbiter = Arbiter::new();
        let parts = ChatParts { store, index, embedder, pool, opts };
        let core = Arc::new(ChatCore::new(parts, opened_at_ms, arbiter.handle()));
        let actor_core = core.clone();
        let addr = ChatActor::start_in_arbiter(&arbiter.handle(), move |_| ChatActor::new(actor_core));
        Ok(Self { addr, core })
    }

    pub fn pool(&self) -> &PoolHandle {
        &self.core.pool
    }

    pub fn embedder(&self) -> &EmbedderHandle {
        &self.core.embedder
    }

    pub fn options(&self) -> &ChatOptions {
        &self.core.opts
    }

    /// Starts a turn; the stream yields the reply as it is generated. The
    /// turn's first half (waiting for the conversation's earlier turn,
    /// recall, prompt, waiting for an instance) runs in the conversation's
    /// actor while this future waits: dropping it before it resolves (a
    /// client that left) gives up the turn, and nothing is stored. A wait
    /// for the conversation's earlier turn counts as a queued request
    /// (against the pool's `max_queue`) and times out like one.
    pub async fn send(&self, msg: SendMessage) -> Result<ChatStream, ChatError> {
        let arrived = Instant::now();
        if !self.addr.connected() {
            return Err(ChatError::Stopped);
        }
        let sampling = self.core.check_turn(&msg)?;
        let (started, began) = oneshot::channel();
        let (reply, begun) = oneshot::channel();
        let turn = TurnRequest { msg, sampling, new: None, arrived };
        let queued = self.addr.send(StartTurn { turn, started, reply }).await.map_err(|_| ChatError::Stopped)?;
        if queued {
            // Given up (full queue, timeout, this future dropped): the
            // actor finds `begun` closed and skips the turn.
            let _ = self.core.pool.wait_outside(began).await?;
        }
        let generating = begun.await.map_err(|_| ChatError::Stopped)??;
        Ok(ChatStream::new(generating))
    }

    /// A whole turn with the default sampling.
    pub async fn say(&self, conversation_id: Option<ConversationId>, text: &str) -> Result<ChatReply, ChatError> {
        let msg =
            SendMessage { conversation_id, namespace: None, text: text.to_string(), sampling: None, client: None };
        self.send(msg).await?.finish().await
    }

    pub async fn conversation(&self, id: &ConversationId) -> Result<Conversation, ChatError> {
        Ok(self.core.store.conversation(id).await?)
    }

    pub async fn conversations(&self) -> Result<Vec<Conversation>, ChatError> {
        Ok(self.core.store.list_conversations().await?)
    }

    /// A page of conversations, newest first: those of `namespace` (all
    /// when none) created before the cursor (created_at_ms, id).
    pub async fn conversations_page(
        &self,
        namespace: Option<&str>,
        before: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<Vec<Conversation>, ChatError> {
        Ok(self.core.store.conversations_page(namespace, before, limit).await?)
    }

    /// The conversation store.
    pub fn store(&self) -> &ConversationStore {
        &self.core.store
    }

    /// A page of a conversation's messages, oldest first, after message `after`.
    pub async fn history(
        &self,
        id: &ConversationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ChatError> {
        self.core.store.conversation(id).await?;
        Ok(self.core.store.messages(id, after, limit).await?)
    }

    /// Stores a whole conversation at once with its messages' embeddings
    /// (all or nothing); they are recalled like any others.
    pub async fn import(
        &self,
        namespace: &str,
        title: Option<String>,
        messages: Vec<ImportMessage>,
    ) -> Result<(Conversation, Vec<StoredMessage>), ChatError> {
        self.core.import(namespace, title, messages).await
    }

    /// Checks a conversation to import without storing anything: the
    /// error [`Self::import`] would give before storing.
    pub fn check_import(&self, title: Option<&str>, messages: &[ImportMessage]) -> Result<(), ChatError> {
        self.core.check_import(title, messages)
    }

    pub async fn delete(&self, id: ConversationId) -> Result<usize, ChatError> {
        self.addr.send(DeleteConversation(id)).await.map_err(|_| ChatError::Stopped)?
    }

    /// What memory would recall for `text` in this conversation now (the
    /// recent window left out, as in a turn), with scores.
    pub async fn recall(&self, id: &ConversationId, text: &str) -> Result<Vec<Recalled>, ChatError> {
        let vector = self.core.embedder.embed_one(text).await.map_err(ChatError::Embedding)?;
        self.recall_vector(id, &vector).await
    }

    /// The recall of a turn whose message embeds to `vector` (what
    /// [`Self::recall`] does after embedding): the store's count, the recent
    /// window left out, the conversation's vectors loaded if not cached, the
    /// search, the hits read back from the store.
    /// It waits for a turn of the conversation in progress (its reply's
    /// embedding included) to finish.
    pub async fn recall_vector(&self, id: &ConversationId, vector: &[f32]) -> Result<Vec<Recalled>, ChatError> {
        let conv = self.core.store.conversation(id).await?;
        let recall = RecallIn { conv, vector: vector.to_vec() };
        self.addr.send(recall).await.map_err(|_| ChatError::Stopped)?
    }

    /// Why the conversation store cannot serve, as last seen (no I/O).
    pub fn storage_error(&self) -> Option<String> {
        self.core.store.health()
    }

    /// Asks the store now whether it can serve (readiness).
    pub async fn check_storage(&self) -> Option<String> {
        self.core.store.check().await
    }

    /// Live vectors in the index: in the namespace indexes with
    /// cross-conversation recall, else in the conversation cache.
    pub fn indexed(&self) -> usize {
        self.core.index.len()
    }

    /// What the vector index holds (cache, namespace graphs, builds in progress).
    pub fn index_stats(&self) -> IndexStats {
        self.core.index.stats()
    }

    /// The vector index itself (benchmarks and tests wait for its builds).
    pub fn index(&self) -> &Arc<VectorIndex> {
        &self.core.index
    }

    pub async fn flush(&self) -> Result<(), ChatError> {
        Ok(self.core.store.flush().await?)
    }

    /// Flushes the store and stops the chat actor; the data directory is
    /// released (and the chat arbiter stopped) once every clone of this
    /// handle is dropped and the last turn is over.
    /// Turns still running (their replies' embeddings are made after the
    /// answer) are waited for, up to the embedder's timeout; then the store
    /// is flushed, the chat actor stops and so do the embedder's threads (a
    /// context must not be decoding while the process exits).
    pub async fn shutdown(self) -> Result<(), ChatError> {
        let deadline = std::time::Instant::now() + self.core.embedder.options().timeout;
        while self.core.running.load(std::sync::atomic::Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.flush().await?;
        let index = self.core.index.clone();
        let _ = actix_web::rt::task::spawn_blocking(move || index.save_graphs()).await;
        let _ = self.addr.send(StopChat).await;
        self.core.embedder.shutdown().await;
        Ok(())
    }
}
