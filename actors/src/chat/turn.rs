//! The work of one chat turn: store the user message, recall related earlier
//! messages by meaning, build the prompt within the context budget, generate
//! on a leased instance (streaming), store the reply. The first half runs in
//! the conversation's actor (`chat/conversation.rs`), whose mailbox orders
//! the turns of one conversation; the second half is driven by whoever reads
//! the [`ChatStream`], and the actor waits for it ([`TurnOver`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

/// Without `max_tokens`, a turn's history leaves 1/this of the context to the reply.
const REPLY_SHARE_OF_CONTEXT: u32 = 4;

use actix::ArbiterHandle;
use futures::{FutureExt, StreamExt};
use tokio::sync::oneshot;

use crate::chat::types::{ChatError, ChatEvent, ChatOptions, ChatReply, SendMessage};
use crate::engine::CacheKey;
use crate::memory::index::VectorIndex;
use crate::memory::prompt_builder::{build_prompt, BuiltPrompt, PromptBudget, Recalled};
use crate::memory::store::{Conversation, ConversationId, ConversationStore, NewMessage, StoredMessage};
use crate::memory::EmbedderHandle;
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Role, SamplingParams, Usage};
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

/// Shared state of the chat layer, used by the actors' futures.
pub(crate) struct ChatCore {
    pub(crate) store: ConversationStore,
    pub(crate) index: Arc<VectorIndex>,
    pub(crate) embedder: EmbedderHandle,
    pub(crate) pool: PoolHandle,
    pub(crate) opts: ChatOptions,
    /// The chat arbiter, where the chat actor and the conversations' actors
    /// run. A generation started there keeps its deadline timer and its
    /// lease's watcher on that arbiter's runtime, so the arbiter stops only
    /// when this core goes, with the last turn that holds it ([`Drop`]).
    arbiter: ArbiterHandle,
    /// Turns whose second half (streaming, storing, embedding the reply) runs.
    pub(crate) running: Arc<AtomicUsize>,
    /// With namespace recall on a shared store: per namespace, the store's
    /// clock when this process last read the vectors other replicas added.
    pub(super) synced: Mutex<HashMap<String, u64>>,
    /// The store's clock just before the index was loaded at start-up.
    pub(super) opened_at_ms: u64,
}

/// What the chat layer is made of.
pub(crate) struct ChatParts {
    pub(crate) store: ConversationStore,
    pub(crate) index: Arc<VectorIndex>,
    pub(crate) embedder: EmbedderHandle,
    pub(crate) pool: PoolHandle,
    pub(crate) opts: ChatOptions,
}

impl Drop for ChatCore {
    fn drop(&mut self) {
        self.arbiter.stop();
    }
}

/// A turn as the conversation's actor receives it: checked at the edge
/// ([`ChatCore::check_turn`]), not begun.
pub(crate) struct TurnRequest {
    pub(crate) msg: SendMessage,
    pub(crate) sampling: SamplingParams,
    /// The conversation this turn starts (not stored yet); none for a
    /// stored one, read when the turn begins.
    pub(crate) new: Option<Conversation>,
    /// When the caller asked: a wait for the conversation's earlier turn
    /// counts as memory time.
    pub(crate) arrived: Instant,
}

/// Held by a turn until it is over: its reply stored and embedded, or the
/// turn given up (failed, or its stream dropped before anything was read).
/// Dropping it lets the conversation's actor go on to the next turn.
pub(crate) struct TurnOver {
    _over: oneshot::Sender<()>,
}

impl TurnOver {
    /// A turn's guard, and what resolves when it is dropped.
    pub(crate) fn new() -> (Self, oneshot::Receiver<()>) {
        let (over, rx) = oneshot::channel();
        (Self { _over: over }, rx)
    }
}

/// Counts a running turn for as long as it lives.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ChatCore {
    pub(crate) fn new(parts: ChatParts, opened_at_ms: u64, arbiter: ArbiterHandle) -> Self {
        let ChatParts { store, index, embedder, pool, opts } = parts;
        Self {
            store,
            index,
            embedder,
            pool,
            opts,
            arbiter,
            running: Arc::default(),
            synced: Mutex::default(),
            opened_at_ms,
        }
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

    /// The checks of a turn at the edge, before it is queued or anything is
    /// embedded or stored: the message, and the sampling for this context
    /// (checked again, with the prompt, when the request is prepared).
    /// Returns the sampling the turn uses.
    pub(crate) fn check_turn(&self, msg: &SendMessage) -> Result<SamplingParams, ChatError> {
        self.validate(&msg.text)?;
        let sampling = msg.sampling.clone().unwrap_or_else(|| self.opts.sampling.clone());
        let n_ctx = self.pool.options().instance.n_ctx;
        sampling.validate_for(n_ctx, self.pool.engine().n_vocab())?;
        Ok(sampling)
    }

    /// The first half of a turn, once the conversation's earlier turns are
    /// over: read the conversation, embed the message, recall, build the
    /// prompt, wait for an instance and start generating. Nothing is stored
    /// yet. The turn holds `over` until it is over ([`Generating::settle`]).
    pub(crate) async fn begin_turn(
        self: Arc<Self>,
        id: ConversationId,
        turn: TurnRequest,
        over: TurnOver,
    ) -> Result<Box<Generating>, ChatError> {
        let TurnRequest { msg, sampling, new, arrived } = turn;
        // A new conversation is stored with its first message, after admission.
        let clock = StoreClock::default();
        let (conv, is_new) = match new {
            Some(conv) => (conv, true),
            None => (clock.time(self.store.conversation(&id)).await?, false),
        };

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
        let memory_ns = arrived.elapsed().as_nanos() as u64;
        let generation = self.pool.run_as(request, key, msg.client).await?;
        let (instance, slot) = (generation.instance(), generation.slot());

        // Nothing is stored yet: the user message is stored with the reply,
        // once the client has seen some of it (a turn whose client left
        // before that, or that failed, leaves no trace).
        let turn = Turn {
            core: self.clone(),
            conv,
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
        Ok(Box::new(Generating { turn, generation, text: String::new(), delivered: false, over, running }))
    }

    /// Deletes a conversation (in its actor, after its earlier turns).
    pub(crate) async fn delete(&self, id: ConversationId) -> Result<usize, ChatError> {
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

/// What a turn holds while its reply is generated. Made in the
/// conversation's actor and sent to the caller, which reads it as a
/// [`ChatStream`]; dropped unread (the caller left), it stops the generation
/// and stores nothing.
pub(crate) struct Generating {
    turn: Turn,
    generation: crate::pool::lease::GenerationStream,
    text: String,
    /// Whether the caller has read a piece of the reply.
    delivered: bool,
    over: TurnOver,
    running: Running,
}

impl Generating {
    /// Stores the turn as it ended, then answers; the reply's embedding
    /// follows off the answer's path, and the turn is over once it is made
    /// (the conversation's next turn waits for it).
    fn settle(self, outcome: Result<Completion, ChatError>) -> futures::future::LocalBoxFuture<'static, ChatEvent> {
        let Generating { turn, generation, text, delivered, over, running } = self;
        drop(generation);
        Box::pin(async move {
            let (event, saved) = turn.settle(outcome, &text, delivered).await;
            if let Some(id) = saved {
                actix::spawn(async move {
                    turn.core.embed_stored(&turn.conv, id, &text).await;
                    drop((over, running));
                });
            }
            event
        })
    }
}

impl ChatStream {
    /// The stream of a turn its conversation's actor began.
    pub(crate) fn new(generating: Box<Generating>) -> Self {
        Self { conversation_id: generating.turn.conv.id, state: TurnState::Generating(generating), shows_pieces: true }
    }

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
