//! The work of one chat turn, behind the chat actor: store the user message,
//! recall related earlier messages by meaning, build the prompt within the
//! context budget, generate on a leased instance (streaming), store the reply.
//! Turns of one conversation are serialised by a per-conversation lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

/// Without `max_tokens`, a turn's history leaves 1/this of the context to the reply.
const REPLY_SHARE_OF_CONTEXT: u32 = 4;

use futures::{FutureExt, StreamExt};
use tokio::sync::OwnedMutexGuard;

use crate::chat::types::{ChatError, ChatEvent, ChatOptions, ChatReply, SendMessage};
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
            let built =
                build_prompt(&system, recalled.clone(), &recent_turns, &text, budget, &|m| engine.prompt_tokens(m))?;
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
        // Before anything is embedded or stored (checked again, with the
        // prompt, when the request is prepared).
        let n_ctx = self.pool.options().instance.n_ctx;
        sampling.validate_for(n_ctx, self.pool.engine().n_vocab())?;
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
        // The prompt was tokenized while it was built: checked, not tokenized again.
        let request = self.pool.prepared_tokens(request, built.prompt).await?;
        let memory_ns = memory_started.elapsed().as_nanos() as u64;
        let generation = self.pool.run_as(request, key, msg.client).await?;
        let (instance, slot) = (generation.instance(), generation.slot());

        // Nothing is stored yet: the user message is stored with the reply,
        // once the client has seen some of it (a turn whose client left
        // before that, or that failed, leaves no trace).
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
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.running.clone());
        let generating = Generating { turn, generation, text: String::new(), delivered: false, lock: guard, running };
        Ok(ChatStream {
            conversation_id: conv.id,
            state: TurnState::Generating(Box::new(generating)),
            shows_pieces: true,
        })
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
}

/// A turn in progress: the reply as it is generated, read straight from the
/// generation's own channel (no task relays it), then the stored turn.
/// Dropping it stops the generation; a turn dropped before any piece of its
/// reply was read stores nothing, its user message included; one dropped
/// after stores what was read.
pub struct ChatStream {
    pub conversation_id: ConversationId,
    state: TurnState,
    /// Whether a piece read counts as shown to the caller: not when the
    /// caller waits for the whole reply ([`Self::finish`]), which it sees
    /// only once the turn is stored.
    shows_pieces: bool,
}

enum TurnState {
    Generating(Box<Generating>),
    /// Storing the turn; yields its last event.
    Settling(futures::future::LocalBoxFuture<'static, ChatEvent>),
    Ended,
}

/// What a turn holds while its reply is generated.
struct Generating {
    turn: Turn,
    generation: crate::pool::lease::GenerationStream,
    text: String,
    /// Whether the caller has read a piece of the reply.
    delivered: bool,
    lock: TurnLock,
    running: Running,
}

impl Generating {
    /// Stores the turn as it ended, then answers; the reply's embedding
    /// follows off the answer's path, still under the conversation's lock
    /// (the next turn of the conversation waits for it).
    fn settle(self, outcome: Result<Completion, ChatError>) -> futures::future::LocalBoxFuture<'static, ChatEvent> {
        let Generating { turn, generation, text, delivered, lock, running } = self;
        drop(generation);
        Box::pin(async move {
            let (event, saved) = turn.settle(outcome, &text, delivered).await;
            if let Some(id) = saved {
                actix::spawn(async move {
                    turn.core.embed_stored(&turn.conv, id, &text).await;
                    drop((lock, running));
                });
            }
            event
        })
    }
}

impl ChatStream {
    pub async fn next_event(&mut self) -> Option<ChatEvent> {
        self.next().await
    }

    /// Waits for the whole reply (dropped before it is stored, it stores nothing).
    pub async fn finish(mut self) -> Result<ChatReply, ChatError> {
        self.shows_pieces = false;
        while let Some(ev) = self.next().await {
            match ev {
                ChatEvent::Token(_) => {}
                ChatEvent::Done(r) => return Ok(*r),
                ChatEvent::Error(e) => return Err(e),
            }
        }
        Err(ChatError::Internal("the turn ended without a result".into()))
    }
}

impl futures::Stream for ChatStream {
    type Item = ChatEvent;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<ChatEvent>> {
        let shows_pieces = self.shows_pieces;
        loop {
            match &mut self.state {
                TurnState::Generating(g) => {
                    let outcome = match g.generation.poll_next_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(GenEvent::Token(t))) => {
                            g.text.push_str(&t);
                            g.delivered |= shows_pieces;
                            return Poll::Ready(Some(ChatEvent::Token(t)));
                        }
                        Poll::Ready(Some(GenEvent::Logprob(_))) => continue,
                        Poll::Ready(Some(GenEvent::Done(c))) => Ok(c),
                        Poll::Ready(Some(GenEvent::Error(e))) => Err(e.into()),
                        Poll::Ready(None) => {
                            Err(ChatError::Internal("the generation stream ended without a result".into()))
                        }
                    };
                    let TurnState::Generating(g) = std::mem::replace(&mut self.state, TurnState::Ended) else {
                        unreachable!()
                    };
                    self.state = TurnState::Settling(g.settle(outcome));
                }
                TurnState::Settling(future) => {
                    let event = std::task::ready!(future.poll_unpin(cx));
                    self.state = TurnState::Ended;
                    return Poll::Ready(Some(event));
                }
                TurnState::Ended => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for ChatStream {
    /// The caller left: the generation stops, and what it read is stored
    /// (nothing, if it read nothing); a turn being stored is stored to the end.
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, TurnState::Ended) {
            TurnState::Generating(g) => {
                let cancelled = Completion { usage: Usage::default(), finish_reason: FinishReason::Cancelled };
                let settle = g.settle(Ok(cancelled));
                actix::spawn(async move {
                    settle.await;
                });
            }
            TurnState::Settling(settle) => {
                actix::spawn(async move {
                    settle.await;
                });
            }
            TurnState::Ended => {}
        }
    }
}

impl Turn {
    /// Stores the turn as it ended: user message and reply together when the
    /// caller saw some of the reply (a turn whose caller saw none of it, because
    /// it left or the generation failed first, stores nothing: a retry would
    /// store it twice). Returns the last event and the stored reply's id.
    async fn settle(&self, outcome: Result<Completion, ChatError>, text: &str, seen: bool) -> (ChatEvent, Option<u64>) {
        match outcome {
            Ok(done) if done.finish_reason == FinishReason::Cancelled && !seen => {
                (ChatEvent::Error(ChatError::Stopped), None)
            }
            // A reply cut because its reader took nothing for the pause
            // limit is not a turn: nothing of it is stored.
            Ok(done) if done.finish_reason == FinishReason::Stalled => (ChatEvent::Error(ChatError::ReplyCut), None),
            Ok(done) => match self.save(text, &done).await {
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
                    saved = self.save(text, &partial).await.ok().map(|r| r.message_id);
                }
                (ChatEvent::Error(e), saved)
            }
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
