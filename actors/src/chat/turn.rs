//! The work of one chat turn, behind the chat actor: store the user message,
//! recall related earlier messages by meaning, build the prompt within the
//! context budget, generate on a leased instance (streaming), store the reply.
//! Turns of one conversation are serialised by a per-conversation lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Without `max_tokens`, a turn's history leaves 1/this of the context to the reply.
const REPLY_SHARE_OF_CONTEXT: u32 = 4;

use futures::StreamExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::OwnedMutexGuard;

use crate::chat::types::{ChatError, ChatEvent, ChatOptions, ChatReply, ChatStream, SendMessage};
use crate::engine::CacheKey;
use crate::memory::index::VectorIndex;
use crate::memory::prompt_builder::{build_prompt, BuiltPrompt, PromptBudget, Recalled};
use crate::memory::store::{Conversation, ConversationId, ConversationStore, NewMessage, StoredMessage};
use crate::memory::EmbedderHandle;
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Role, Usage};
use crate::pool::handle::PoolHandle;
use crate::pool::lease::GenEvent;

/// Time spent waiting on the conversation store, summed over one turn's calls.
#[derive(Default)]
pub(crate) struct StoreClock(AtomicU64);

impl StoreClock {
    pub(super) async fn time<T>(&self, call: impl std::future::Future<Output = T>) -> T {
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
    /// With namespace recall on a shared store: per namespace, the store's
    /// clock when this process last read the vectors other replicas added.
    pub(super) synced: Mutex<HashMap<String, u64>>,
    /// The store's clock just before the index was loaded at start-up.
    pub(super) opened_at_ms: u64,
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
        opened_at_ms: u64,
    ) -> Self {
        Self {
            store,
            index,
            embedder,
            pool,
            opts,
            locks: Arc::default(),
            running: Arc::default(),
            synced: Mutex::default(),
            opened_at_ms,
        }
    }

    pub(crate) async fn lock(&self, id: ConversationId) -> TurnLock {
        let m = self.locks.0.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().clone();
        TurnLock { guard: Some(m.lock_owned().await), locks: self.locks.clone(), id }
    }

    /// The lock of a turn: when an earlier turn of the conversation holds
    /// it, the wait counts as a queued request (against the pool's
    /// `max_queue`) and times out like one.
    async fn lock_turn(&self, id: ConversationId) -> Result<TurnLock, ChatError> {
        let m = self.locks.0.lock().unwrap_or_else(|e| e.into_inner()).entry(id).or_default().clone();
        // Made before the wait: a wait given up (timeout, client gone) still
        // forgets the conversation's mutex when nobody else holds it.
        let mut lock = TurnLock { guard: None, locks: self.locks.clone(), id };
        lock.guard = Some(match m.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => self.pool.wait_outside(m.lock_owned()).await?,
        });
        Ok(lock)
    }

    /// The prompt for a turn: tokenizing is blocking work, done on a blocking thread.
    async fn build(
        self: &Arc<Self>,
        recent: &[StoredMessage],
        recalled: Vec<Recalled>,
        text: &str,
        max_tokens: Option<u32>,
    ) -> Result<(Vec<Recalled>, BuiltPrompt), ChatError> {
        let engine = self.pool.engine().clone();
        let recent_turns: Vec<ChatMessage> =
            recent.iter().map(|m| ChatMessage::new(m.role, m.content.clone())).collect();
        // Without max_tokens the reply runs to the end of the context; the
        // history leaves it a quarter of the context at least.
        let n_ctx = self.pool.options().instance.n_ctx;
        let budget = PromptBudget { n_ctx, max_tokens: max_tokens.unwrap_or(n_ctx / REPLY_SHARE_OF_CONTEXT) };
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
        let guard = self.lock_turn(conv.id).await?;

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

        // The conversation's next turn goes back to the instance that holds its prefix.
        // Its KV cache is kept by conversation, within its namespace.
        let key = Some(CacheKey::new(&conv.namespace, conv.id.as_bytes()));
        let request = GenerateRequest { messages: built.messages.clone(), sampling, raw_prompt: None };
        let memory_ns = memory_started.elapsed().as_nanos() as u64;
        let generation = self.pool.generate_for(request, key).await?;
        let (instance, slot) = (generation.instance(), generation.slot());

        // Nothing is stored yet: the user message is stored with the reply,
        // once the client has seen some of it (a turn whose client left
        // before that, or that failed, leaves no trace).
        let (tx, rx) = unbounded_channel();
        let delivered = Arc::new(AtomicBool::new(false));
        let turn = Turn {
            core: self.clone(),
            conv: conv.clone(),
            is_new,
            user_text: msg.text,
            user_vector: vector,
            recalled,
            prompt: built.messages,
            instance,
            slot,
            clock,
            memory_ns,
            delivered: delivered.clone(),
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.running.clone());
        actix::spawn(async move {
            let _running = running;
            turn.stream(generation, tx, guard).await
        });
        Ok(ChatStream { conversation_id: conv.id, rx, delivered })
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
    /// Whether the conversation is stored with this turn.
    is_new: bool,
    user_text: String,
    user_vector: Vec<f32>,
    recalled: Vec<Recalled>,
    prompt: Vec<ChatMessage>,
    instance: usize,
    slot: usize,
    clock: StoreClock,
    /// Time spent on memory work on the answer's path so far.
    memory_ns: u64,
    /// Set once the client has read a piece of the reply ([`ChatStream`]).
    delivered: Arc<AtomicBool>,
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
                GenEvent::Logprob(_) => {}
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
        // The turn is stored (user message and reply together), then
        // answered; the reply's embedding follows, off the answer's path but
        // before the conversation's next turn may start (this turn still
        // holds the conversation's lock). A turn whose client saw none of
        // the reply (it left, or the generation failed first) stores nothing:
        // a retry would store it twice.
        let seen = self.delivered.load(Ordering::SeqCst);
        let (event, saved) = match outcome {
            Ok(_) if client_gone && !seen => (ChatEvent::Error(ChatError::Stopped), None),
            Ok(done) => match self.save(&text, &done).await {
                Ok(reply) => {
                    let id = reply.message_id;
                    (ChatEvent::Done(Box::new(reply)), Some(id))
                }
                Err(e) => (ChatEvent::Error(e), None),
            },
            Err(e) => {
                let mut saved = None;
                if seen {
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
        // A remote tokenizer answers over HTTP: counted on a blocking thread.
        let (engine, counted) = (core.pool.engine().clone(), done.usage.completion_tokens);
        let (user_text, reply_text) = (self.user_text.clone(), text.to_string());
        let (user_tokens, tokens) = actix_web::rt::task::spawn_blocking(move || {
            let reply = if counted > 0 { counted } else { engine.count_tokens(&reply_text) };
            (engine.count_tokens(&user_text), reply)
        })
        .await
        .map_err(|_| ChatError::Internal("counting a turn's tokens panicked".into()))?;
        let messages = vec![
            NewMessage::now(Role::User, &self.user_text, user_tokens, self.user_vector.clone()),
            NewMessage::now(Role::Assistant, text, tokens, Vec::new()),
        ];
        let stored = self.clock.time(core.store.append_messages(&self.conv, self.is_new, messages)).await?;
        let [user_msg, msg] = <[StoredMessage; 2]>::try_from(stored)
            .map_err(|_| ChatError::Internal("the store did not return both messages of a turn".into()))?;
        if self.is_new {
            core.index.start_conversation(self.conv.id);
        }
        core.index_message(user_msg.id, &self.conv, self.user_vector.clone()).await;
        let memory_ms = (self.memory_ns + started.elapsed().as_nanos() as u64) as f64 / 1e6;
        Ok(ChatReply {
            conversation_id: self.conv.id,
            user_message_id: user_msg.id,
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
