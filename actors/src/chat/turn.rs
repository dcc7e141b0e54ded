//! The work of one chat turn, behind the chat actor: store the user message,
//! recall related earlier messages by meaning, build the prompt within the
//! context budget, generate on a leased instance (streaming), store the reply.
//! Turns of one conversation are serialised by a per-conversation lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::OwnedMutexGuard;

use crate::chat::actor::{ChatError, ChatEvent, ChatOptions, ChatReply, ChatStream, SendMessage};
use crate::engine::CacheKey;
use crate::memory::index::{Hit, Scope, VectorIndex};
use crate::memory::prompt_builder::{build_prompt, BuiltPrompt, PromptBudget, Recalled};
use crate::memory::store::{Conversation, ConversationId, ConversationStore, StoredMessage};
use crate::memory::{EmbedderHandle, Priority};
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Role, Usage};
use crate::pool::handle::PoolHandle;
use crate::pool::lease::GenEvent;

/// Time spent waiting on the conversation store, summed over one turn's calls.
#[derive(Default)]
pub(crate) struct StoreClock(AtomicU64);

impl StoreClock {
    async fn time<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        self.0.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    fn ms(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Shared state of the chat layer, used by the actor's futures.
pub(crate) struct ChatCore {
    pub(crate) store: ConversationStore,
    pub(crate) index: Arc<VectorIndex>,
    pub(crate) embedder: EmbedderHandle,
    pub(crate) pool: PoolHandle,
    pub(crate) opts: ChatOptions,
    locks: Arc<ConversationLocks>,
    /// Turns whose second half (streaming, storing, embedding the reply) runs.
    pub(crate) running: Arc<AtomicUsize>,
}

/// Counts a running turn for as long as it lives.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ChatCore {
    pub(crate) fn new(
        store: ConversationStore,
        index: Arc<VectorIndex>,
        embedder: EmbedderHandle,
        pool: PoolHandle,
        opts: ChatOptions,
    ) -> Self {
        Self { store, index, embedder, pool, opts, locks: Arc::default(), running: Arc::default() }
    }

    pub(crate) async fn lock(&self, id: ConversationId) -> TurnLock {
        let m = self.locks.0.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().clone();
        TurnLock { guard: Some(m.lock_owned().await), locks: self.locks.clone(), id }
    }

    fn scope(&self, conv: &Conversation) -> Scope {
        if self.opts.cross_conversation {
            Scope::Namespace(conv.namespace.clone())
        } else {
            Scope::Conversation(conv.id)
        }
    }

    /// Messages related to `vector`, best first, leaving out `exclude`. The
    /// conversation has `stored` messages in the store.
    pub(crate) async fn recall(
        self: &Arc<Self>,
        conv: &Conversation,
        vector: &[f32],
        exclude: HashSet<u64>,
        stored: usize,
        clock: &StoreClock,
    ) -> Result<Vec<Recalled>, ChatError> {
        let scope = self.scope(conv);
        if matches!(scope, Scope::Conversation(_)) {
            self.ensure_loaded(conv, stored, clock).await?;
        }
        // Scoring is CPU work: a blocking thread does it, never an arbiter.
        let (core, query) = (self.clone(), vector.to_vec());
        let hits: Vec<Hit> = actix_web::rt::task::spawn_blocking(move || {
            // None only if the conversation was evicted since it was loaded:
            // it then has nothing to recall from this turn on, which is rare
            // enough (a cache of 256k vectors) not to load it twice.
            core.index.search(&query, core.opts.recall_k, &scope, &exclude).unwrap_or_default()
        })
        .await
        .map_err(|_| ChatError::Internal("searching the memory index panicked".into()))?;
        let hits: Vec<Hit> = hits.into_iter().filter(|h| h.score >= self.opts.recall_min_score).collect();
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<(ConversationId, u64)> = hits.iter().map(|h| (h.conversation_id, h.id)).collect();
        let mut found: HashMap<u64, StoredMessage> =
            clock.time(self.store.messages_by_id(&ids)).await?.into_iter().map(|m| (m.id, m)).collect();
        // Best first; a message deleted meanwhile (by another replica) is left out.
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                let m = found.remove(&h.id)?;
                Some(Recalled { id: m.id, role: m.role, content: m.content, score: h.score })
            })
            .collect())
    }

    /// Loads a conversation's vectors from the store into the index's cache
    /// when it is not cached, or holds fewer of its messages than the store's
    /// `stored` (another replica wrote to it). With namespace recall on a
    /// shared store, vectors other replicas wrote join the namespace index too.
    async fn ensure_loaded(
        self: &Arc<Self>,
        conv: &Conversation,
        stored: usize,
        clock: &StoreClock,
    ) -> Result<(), ChatError> {
        if self.index.conversation_seen(&conv.id).is_some_and(|seen| seen >= stored) {
            return Ok(());
        }
        let mut vectors = clock.time(self.store.vectors(Some(&conv.id))).await?;
        if vectors.len() < stored {
            vectors.extend(self.embed_missing(conv, &vectors, stored, clock).await?);
        }
        let (index, conv, shared) = (self.index.clone(), conv.clone(), self.store.shared());
        actix_web::rt::task::spawn_blocking(move || {
            if shared && index.options().namespaces {
                let missing: Vec<_> = vectors
                    .iter()
                    .filter(|(id, _, _)| !index.contains(&conv.namespace, *id))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    tracing::debug!(conversation = %conv.id, loaded = missing.len(), "namespace vectors loaded from the store");
                    index.insert_namespace(missing, &conv.namespace);
                }
            }
            index.load_conversation(conv.id, stored, vectors.into_iter().map(|(id, _, v)| (id, v)).collect());
        })
        .await
        .map_err(|_| ChatError::Internal("loading a conversation's vectors panicked".into()))
    }

    /// Embeds and stores the vectors of a conversation's messages that have
    /// none (a reply whose embedding was interrupted by a restart).
    async fn embed_missing(
        &self,
        conv: &Conversation,
        have: &[(u64, ConversationId, Vec<f32>)],
        stored: usize,
        clock: &StoreClock,
    ) -> Result<Vec<(u64, ConversationId, Vec<f32>)>, ChatError> {
        let have: HashSet<u64> = have.iter().map(|(id, _, _)| *id).collect();
        let messages = clock.time(self.store.messages(&conv.id, None, stored)).await?;
        let missing: Vec<StoredMessage> = messages.into_iter().filter(|m| !have.contains(&m.id)).collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        tracing::info!(conversation = %conv.id, messages = missing.len(), "embedding messages stored without a vector");
        let texts = missing.iter().map(|m| embedded_text(&m.content).to_string()).collect();
        let vectors = self.embedder.embed_as(texts, Priority::Interactive).await.map_err(ChatError::Embedding)?;
        let mut out = Vec::with_capacity(missing.len());
        for (m, v) in missing.into_iter().zip(vectors) {
            if clock.time(self.store.set_vector(&conv.id, m.id, &v)).await? {
                out.push((m.id, conv.id, v));
            }
        }
        Ok(out)
    }

    /// Adds a stored message's vector to the index, off the arbiter (a graph
    /// insert is CPU work).
    pub(crate) async fn index_message(self: &Arc<Self>, id: u64, conv: &Conversation, vector: Vec<f32>) {
        let (index, conv_id, ns) = (self.index.clone(), conv.id, conv.namespace.clone());
        let _ = actix_web::rt::task::spawn_blocking(move || index.insert(id, conv_id, &ns, vector)).await;
    }

    /// The prompt for a turn: tokenizing is blocking work, done on a blocking thread.
    async fn build(
        self: &Arc<Self>,
        recent: &[StoredMessage],
        recalled: Vec<Recalled>,
        text: &str,
        max_tokens: u32,
    ) -> Result<(Vec<Recalled>, BuiltPrompt), ChatError> {
        let engine = self.pool.engine().clone();
        let recent_turns: Vec<ChatMessage> =
            recent.iter().map(|m| ChatMessage::new(m.role, m.content.clone())).collect();
        let budget = PromptBudget { n_ctx: self.pool.options().instance.n_ctx, max_tokens };
        let (system, text) = (self.opts.system_prompt.clone(), text.to_string());
        actix_web::rt::task::spawn_blocking(move || {
            let built = build_prompt(&system, recalled.clone(), &recent_turns, &text, budget, &|m| {
                engine.count_prompt_tokens(m)
            })?;
            let recalled = recalled.into_iter().filter(|r| built.recalled.contains(&r.id)).collect();
            Ok((recalled, built))
        })
        .await
        .map_err(|_| ChatError::Internal("building the prompt panicked".into()))?
    }

    /// The recent messages offered to the prompt, of the conversation's
    /// `total` stored messages. The window's start moves in steps of half the
    /// window, not one turn at a time, so that the prompt's beginning (and the
    /// KV cache that holds it) stays the same for several turns: between half
    /// and all of `recent_messages` are offered.
    pub(crate) async fn recent_window(
        &self,
        conv: &ConversationId,
        total: usize,
        clock: &StoreClock,
    ) -> Result<Vec<StoredMessage>, ChatError> {
        let n = self.opts.recent_messages;
        if n == 0 || total == 0 {
            return Ok(Vec::new());
        }
        let step = (n / 2).max(1);
        let start = total.saturating_sub(n).div_ceil(step) * step;
        Ok(clock.time(self.store.recent(conv, total - start.min(total))).await?)
    }

    pub(crate) fn validate(&self, text: &str) -> Result<(), ChatError> {
        let chars = text.chars().count();
        if text.trim().is_empty() {
            return Err(ChatError::InvalidInput {
                field: "message",
                rule: "must not be empty",
                value: format!("{text:?}"),
            });
        }
        if chars > self.opts.max_message_chars {
            return Err(ChatError::InvalidInput {
                field: "message",
                rule: "is longer than the limit of max_message_chars",
                value: format!("{chars} characters (limit {})", self.opts.max_message_chars),
            });
        }
        // PostgreSQL's text cannot hold U+0000; sled could, but both stores take the same texts.
        if let Some(at) = text.chars().position(|c| c == '\0') {
            return Err(ChatError::InvalidInput {
                field: "message",
                rule: "must not contain the character U+0000 (NUL)",
                value: format!("U+0000 at character {at}"),
            });
        }
        Ok(())
    }

    pub(crate) async fn send(self: Arc<Self>, msg: SendMessage) -> Result<ChatStream, ChatError> {
        self.validate(&msg.text)?;
        let sampling = msg.sampling.unwrap_or_else(|| self.opts.sampling.clone());
        sampling.validate()?;
        // A new conversation is stored with its first message, after admission.
        let clock = StoreClock::default();
        let memory_started = Instant::now();
        let (conv, is_new) = match msg.conversation_id {
            Some(id) => (clock.time(self.store.conversation(&id)).await?, false),
            None => (Conversation::new(msg.namespace.as_deref().unwrap_or("default")), true),
        };
        let guard = self.lock(conv.id).await;

        let vector = self.embedder.embed_one(&msg.text).await.map_err(ChatError::Embedding)?;
        let stored = if is_new { 0 } else { clock.time(self.store.count(&conv.id)).await? };
        let recent = self.recent_window(&conv.id, stored, &clock).await?;
        let exclude: HashSet<u64> = recent.iter().map(|m| m.id).collect();
        // A new conversation has nothing of its own to recall; its namespace may.
        let recalled = if is_new && !self.opts.cross_conversation {
            Vec::new()
        } else {
            self.recall(&conv, &vector, exclude, stored, &clock).await?
        };
        let (recalled, built) = self.build(&recent, recalled, &msg.text, sampling.max_tokens).await?;
        let engine = self.pool.engine().clone();

        // Admission before anything is stored: a rejected turn leaves no trace.
        // The conversation's next turn goes back to the instance that holds its prefix.
        // Its KV cache is kept by conversation, within its namespace.
        let key = Some(CacheKey::new(&conv.namespace, conv.id.as_bytes()));
        let request = GenerateRequest { messages: built.messages.clone(), sampling };
        let mut memory_ns = memory_started.elapsed().as_nanos() as u64;
        let generation = self.pool.generate_for(request, key).await?;
        let after_admission = Instant::now();
        let (instance, slot) = (generation.instance(), generation.slot());
        let user_tokens = engine.count_tokens(&msg.text);
        let user_msg =
            clock.time(self.store.append(&conv, is_new, Role::User, &msg.text, user_tokens, &vector)).await?;
        if is_new {
            self.index.start_conversation(conv.id);
        }
        self.index_message(user_msg.id, &conv, vector).await;
        memory_ns += after_admission.elapsed().as_nanos() as u64;

        let (tx, rx) = unbounded_channel();
        let turn = Turn {
            core: self.clone(),
            conv: conv.clone(),
            user_msg,
            recalled,
            prompt: built.messages,
            instance,
            slot,
            clock,
            memory_ns,
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.running.clone());
        actix::spawn(async move {
            let _running = running;
            turn.stream(generation, tx, guard).await
        });
        Ok(ChatStream { conversation_id: conv.id, rx })
    }

    /// Embeds a stored message that has no vector yet (a reply, just
    /// answered), stores the vector and indexes it. A failure is logged: the
    /// message then has no vector until its conversation is next loaded
    /// ([`Self::ensure_loaded`] embeds what lacks one).
    pub(crate) async fn embed_stored(self: &Arc<Self>, conv: &Conversation, id: u64, text: &str) {
        let text = embedded_text(text);
        let result = async {
            let vector = self.embedder.embed_one(text).await.map_err(ChatError::Embedding)?;
            if self.store.set_vector(&conv.id, id, &vector).await? {
                self.index_message(id, conv, vector).await;
            }
            Ok::<_, ChatError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(conversation = %conv.id, message = id, error = %e, "a reply's embedding is missing; it is made when the conversation is next loaded");
        }
    }

    pub(crate) async fn delete(&self, id: ConversationId) -> Result<usize, ChatError> {
        let _guard = self.lock(id).await;
        let ids = self.store.delete_conversation(&id).await?;
        let index = self.index.clone();
        let _ = actix_web::rt::task::spawn_blocking(move || index.remove_conversation(&id)).await;
        // Its KV cache goes too: what it said is not kept in memory or on disk.
        if let Some(tiers) = self.pool.kv_tiers() {
            let conversation = CacheKey::new("", id.as_bytes()).conversation;
            let _ = actix_web::rt::task::spawn_blocking(move || tiers.forget_conversation(conversation)).await;
        }
        Ok(ids.len())
    }
}

type ConversationMutex = Arc<tokio::sync::Mutex<()>>;

/// The text a stored message is embedded as: an empty reply (the model
/// stopped at once) still gets a vector, so it is never embedded again.
fn embedded_text(content: &str) -> &str {
    if content.trim().is_empty() {
        "(empty reply)"
    } else {
        content
    }
}

/// One mutex per conversation with a turn running or waiting.
#[derive(Default)]
struct ConversationLocks(Mutex<HashMap<ConversationId, ConversationMutex>>);

/// Holds a conversation's turn lock; on drop, forgets the mutex when no other
/// turn holds or waits for it, so the map does not grow with every conversation.
pub(crate) struct TurnLock {
    guard: Option<OwnedMutexGuard<()>>,
    locks: Arc<ConversationLocks>,
    id: ConversationId,
}

impl Drop for TurnLock {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under this lock: a count of 1 is the map's own.
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.id);
        }
    }
}

/// The second half of a turn: stream the reply, then store it.
struct Turn {
    core: Arc<ChatCore>,
    conv: Conversation,
    user_msg: StoredMessage,
    recalled: Vec<Recalled>,
    prompt: Vec<ChatMessage>,
    instance: usize,
    slot: usize,
    clock: StoreClock,
    /// Time spent on memory work on the answer's path so far.
    memory_ns: u64,
}

impl Turn {
    async fn stream(
        self,
        mut generation: crate::pool::lease::GenerationStream,
        tx: UnboundedSender<ChatEvent>,
        _lock: TurnLock,
    ) {
        let mut text = String::new();
        let mut client_gone = false;
        let mut outcome: Result<Completion, ChatError> =
            Err(ChatError::Internal("the generation stream ended without a result".into()));
        while let Some(ev) = generation.next().await {
            match ev {
                GenEvent::Token(t) => {
                    text.push_str(&t);
                    if !client_gone && tx.send(ChatEvent::Token(t)).is_err() {
                        // The client left: stop generating, keep what was said.
                        client_gone = true;
                        break;
                    }
                }
                GenEvent::Done(c) => {
                    outcome = Ok(c);
                    break;
                }
                GenEvent::Error(e) => {
                    outcome = Err(e.into());
                    break;
                }
            }
        }
        drop(generation);
        if client_gone {
            outcome = Ok(Completion { usage: Usage::default(), finish_reason: FinishReason::Cancelled });
        }
        // The reply is stored, then answered; its embedding follows, off the
        // answer's path but before the conversation's next turn may start
        // (this turn still holds the conversation's lock).
        let (event, saved) = match outcome {
            Ok(done) => match self.save(&text, &done).await {
                Ok(reply) => {
                    let id = reply.message_id;
                    (ChatEvent::Done(Box::new(reply)), Some(id))
                }
                Err(e) => (ChatEvent::Error(e), None),
            },
            Err(e) => {
                let mut saved = None;
                if !text.is_empty() {
                    let partial = Completion { usage: Usage::default(), finish_reason: FinishReason::Cancelled };
                    saved = self.save(&text, &partial).await.ok().map(|r| r.message_id);
                }
                (ChatEvent::Error(e), saved)
            }
        };
        let _ = tx.send(event);
        if let Some(id) = saved {
            self.core.embed_stored(&self.conv, id, &text).await;
        }
    }

    /// Stores the reply (its embedding comes after, [`ChatCore::embed_stored`]).
    async fn save(&self, text: &str, done: &Completion) -> Result<ChatReply, ChatError> {
        let core = &self.core;
        let started = Instant::now();
        let tokens = if done.usage.completion_tokens > 0 {
            done.usage.completion_tokens
        } else {
            core.pool.engine().count_tokens(text)
        };
        let msg = self.clock.time(core.store.append(&self.conv, false, Role::Assistant, text, tokens, &[])).await?;
        let memory_ms = (self.memory_ns + started.elapsed().as_nanos() as u64) as f64 / 1e6;
        Ok(ChatReply {
            conversation_id: self.conv.id,
            user_message_id: self.user_msg.id,
            message_id: msg.id,
            reply: text.to_string(),
            usage: done.usage,
            finish_reason: done.finish_reason,
            recalled: self.recalled.clone(),
            prompt: self.prompt.clone(),
            instance: self.instance,
            slot: self.slot,
            store_ms: self.clock.ms(),
            memory_ms,
        })
    }
}
