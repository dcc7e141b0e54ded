//! The work of one chat turn, behind the chat actor: store the user message,
//! recall related earlier messages by meaning, build the prompt within the
//! context budget, generate on a leased instance (streaming), store the reply.
//! Turns of one conversation are serialised by a per-conversation lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::OwnedMutexGuard;

use crate::chat::actor::{ChatError, ChatEvent, ChatOptions, ChatReply, ChatStream, SendMessage};
use crate::memory::index::{Hit, Scope, VectorIndex};
use crate::memory::prompt_builder::{build_prompt, BuiltPrompt, PromptBudget, Recalled};
use crate::memory::store::{Conversation, ConversationId, ConversationStore, StoredMessage};
use crate::memory::EmbedderHandle;
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
}

impl ChatCore {
    pub(crate) fn new(
        store: ConversationStore,
        index: Arc<VectorIndex>,
        embedder: EmbedderHandle,
        pool: PoolHandle,
        opts: ChatOptions,
    ) -> Self {
        Self { store, index, embedder, pool, opts, locks: Arc::default() }
    }

    async fn lock(&self, id: ConversationId) -> TurnLock {
        let m = self.locks.0.lock().expect("locks").entry(id).or_default().clone();
        TurnLock { guard: Some(m.lock_owned().await), locks: self.locks.clone(), id }
    }

    fn scope(&self, conv: &Conversation) -> Scope {
        if self.opts.cross_conversation {
            Scope::Namespace(conv.namespace.clone())
        } else {
            Scope::Conversation(conv.id)
        }
    }

    /// Messages related to `vector`, best first, leaving out `exclude`.
    pub(crate) async fn recall(
        self: &Arc<Self>,
        conv: &Conversation,
        vector: &[f32],
        exclude: HashSet<u64>,
        clock: &StoreClock,
    ) -> Result<Vec<Recalled>, ChatError> {
        // Searching a large namespace is CPU work: a blocking thread does it,
        // never the arbiter that hosts the pool manager.
        let (core, scope, query) = (self.clone(), self.scope(conv), vector.to_vec());
        let hits: Vec<Hit> = actix_web::rt::task::spawn_blocking(move || {
            core.index.search(&query, core.opts.recall_k, &scope, &exclude)
        })
        .await
        .map_err(|_| ChatError::Internal("searching the memory index panicked".into()))?;
        let hits: Vec<Hit> = hits.into_iter().filter(|h| h.score >= self.opts.recall_min_score).collect();
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

    /// With a store other replicas write to, the index here is a cache: when
    /// it holds fewer of this conversation's messages than the store
    /// (`stored`), the missing vectors are loaded before recall.
    async fn catch_up(&self, conv: &Conversation, stored: usize, clock: &StoreClock) -> Result<(), ChatError> {
        if !self.store.shared() || self.index.conversation_len(&conv.id) >= stored {
            return Ok(());
        }
        let vectors = clock.time(self.store.vectors(Some(&conv.id))).await?;
        let missing: Vec<_> = vectors
            .into_iter()
            .filter(|(id, _, _)| !self.index.contains(*id))
            .map(|(id, c, v)| (id, c, conv.namespace.clone(), v))
            .collect();
        tracing::debug!(conversation = %conv.id, loaded = missing.len(), "conversation vectors loaded from the store");
        self.index.insert_many(missing);
        Ok(())
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
        Ok(())
    }

    pub(crate) async fn send(self: Arc<Self>, msg: SendMessage) -> Result<ChatStream, ChatError> {
        self.validate(&msg.text)?;
        let sampling = msg.sampling.unwrap_or_else(|| self.opts.sampling.clone());
        sampling.validate()?;
        // A new conversation is stored with its first message, after admission.
        let clock = StoreClock::default();
        let (conv, is_new) = match msg.conversation_id {
            Some(id) => (clock.time(self.store.conversation(&id)).await?, false),
            None => (Conversation::new(msg.namespace.as_deref().unwrap_or("default")), true),
        };
        let guard = self.lock(conv.id).await;

        let vector = self.embedder.embed_one(&msg.text).await.map_err(ChatError::Embedding)?;
        let stored = if is_new { 0 } else { clock.time(self.store.count(&conv.id)).await? };
        self.catch_up(&conv, stored, &clock).await?;
        let recent = self.recent_window(&conv.id, stored, &clock).await?;
        let exclude: HashSet<u64> = recent.iter().map(|m| m.id).collect();
        let recalled = self.recall(&conv, &vector, exclude, &clock).await?;
        let (recalled, built) = self.build(&recent, recalled, &msg.text, sampling.max_tokens).await?;
        let engine = self.pool.engine().clone();

        // Admission before anything is stored: a rejected turn leaves no trace.
        // The conversation's next turn goes back to the instance that holds its prefix.
        let affinity = Some(affinity_key(conv.id.as_bytes()));
        let request = GenerateRequest { messages: built.messages.clone(), sampling };
        let generation = self.pool.generate_for(request, affinity).await?;
        let (instance, slot) = (generation.instance(), generation.slot());
        let user_tokens = engine.count_tokens(&msg.text);
        let user_msg =
            clock.time(self.store.append(&conv, is_new, Role::User, &msg.text, user_tokens, &vector)).await?;
        self.index.insert(user_msg.id, conv.id, &conv.namespace, vector);

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
        };
        actix::spawn(turn.stream(generation, tx, guard));
        Ok(ChatStream { conversation_id: conv.id, rx })
    }

    pub(crate) async fn delete(&self, id: ConversationId) -> Result<usize, ChatError> {
        let _guard = self.lock(id).await;
        let ids = self.store.delete_conversation(&id).await?;
        self.index.remove_conversation(&id, &ids);
        Ok(ids.len())
    }
}

/// A stable 64-bit key for routing: FNV-1a of `bytes`.
pub fn affinity_key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

type ConversationMutex = Arc<tokio::sync::Mutex<()>>;

/// One mutex per conversation with a turn running or waiting.
#[derive(Default)]
struct ConversationLocks(Mutex<HashMap<ConversationId, ConversationMutex>>);

/// Holds a conversation's turn lock; on drop, forgets the mutex when no other
/// turn holds or waits for it, so the map does not grow with every conversation.
struct TurnLock {
    guard: Option<OwnedMutexGuard<()>>,
    locks: Arc<ConversationLocks>,
    id: ConversationId,
}

impl Drop for TurnLock {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.0.lock().expect("locks");
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
        let event = match outcome {
            Ok(done) => match self.save(&text, &done).await {
                Ok(reply) => ChatEvent::Done(Box::new(reply)),
                Err(e) => ChatEvent::Error(e),
            },
            Err(e) => {
                if !text.is_empty() {
                    let partial = Completion { usage: Usage::default(), finish_reason: FinishReason::Cancelled };
                    let _ = self.save(&text, &partial).await;
                }
                ChatEvent::Error(e)
            }
        };
        let _ = tx.send(event);
    }

    async fn save(&self, text: &str, done: &Completion) -> Result<ChatReply, ChatError> {
        let core = &self.core;
        let vector = core
            .embedder
            .embed_one(if text.trim().is_empty() { "(empty reply)" } else { text })
            .await
            .map_err(ChatError::Embedding)?;
        let tokens = if done.usage.completion_tokens > 0 {
            done.usage.completion_tokens
        } else {
            core.pool.engine().count_tokens(text)
        };
        let msg = self.clock.time(core.store.append(&self.conv, false, Role::Assistant, text, tokens, &vector)).await?;
        core.index.insert(msg.id, self.conv.id, &self.conv.namespace, vector);
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
        })
    }
}
