//! The chat actor: one turn = store the user message, recall related earlier
//! messages by meaning, build the prompt within the context budget, generate
//! on a leased instance (streaming), store the reply. Turns of different
//! conversations run concurrently; turns of one conversation run in order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::OwnedMutexGuard;

use crate::error::{EngineError, PoolError};
use crate::lease::GenEvent;
use crate::memory::index::{Hit, Scope, VectorIndex};
use crate::memory::prompt_builder::{build_prompt, PromptBudget, Recalled};
use crate::memory::store::{Conversation, ConversationId, ConversationStore, StoreError, StoredMessage};
use crate::memory::EmbedderHandle;
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Role, SamplingParams, Usage};
use crate::pool_handle::PoolHandle;

/// Settings of the chat layer.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    pub system_prompt: String,
    /// Most recent messages always considered for the prompt.
    pub recent_messages: usize,
    /// Earlier messages recalled by meaning per turn.
    pub recall_k: usize,
    /// Least cosine similarity for a message to be recalled.
    pub recall_min_score: f32,
    /// Recall from every conversation of the namespace, not only the current one.
    pub cross_conversation: bool,
    /// Longest user message, in characters.
    pub max_message_chars: usize,
    pub sampling: SamplingParams,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            system_prompt: "You are a helpful assistant.".into(),
            recent_messages: 8,
            recall_k: 3,
            recall_min_score: 0.25,
            cross_conversation: false,
            max_message_chars: 16_000,
            sampling: SamplingParams::default(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatError {
    #[error("conversation {0} not found")]
    NotFound(ConversationId),
    #[error("invalid {field}: {rule}, got {value}")]
    InvalidInput { field: &'static str, rule: &'static str, value: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("embedding: {0}")]
    Embedding(EngineError),
    #[error("storage: {0}")]
    Store(String),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ChatError::NotFound(id),
            other => ChatError::Store(other.to_string()),
        }
    }
}

impl From<EngineError> for ChatError {
    fn from(e: EngineError) -> Self {
        ChatError::Pool(PoolError::Engine(e))
    }
}

impl ChatError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ChatError::NotFound(_) => "not_found",
            ChatError::InvalidInput { .. } => "invalid_request",
            ChatError::Pool(p) => p.error_type(),
            ChatError::Embedding(_) => "embedding_error",
            ChatError::Store(_) => "storage_error",
        }
    }
}

/// The result of one turn.
#[derive(Clone, Debug, Serialize)]
pub struct ChatReply {
    pub conversation_id: ConversationId,
    pub user_message_id: u64,
    pub message_id: u64,
    pub reply: String,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    pub recalled: Vec<Recalled>,
    /// The prompt the model saw.
    #[serde(skip)]
    pub prompt: Vec<ChatMessage>,
}

/// What a turn's stream yields: text pieces, then one `Done` or `Error`.
#[derive(Clone, Debug)]
pub enum ChatEvent {
    Token(String),
    Done(Box<ChatReply>),
    Error(ChatError),
}

/// A turn in progress.
pub struct ChatStream {
    pub conversation_id: ConversationId,
    rx: UnboundedReceiver<ChatEvent>,
}

impl ChatStream {
    pub async fn next_event(&mut self) -> Option<ChatEvent> {
        self.rx.recv().await
    }

    /// Waits for the whole reply.
    pub async fn finish(mut self) -> Result<ChatReply, ChatError> {
        while let Some(ev) = self.rx.recv().await {
            match ev {
                ChatEvent::Token(_) => {}
                ChatEvent::Done(r) => return Ok(*r),
                ChatEvent::Error(e) => return Err(e),
            }
        }
        Err(ChatError::Store("the turn ended without a result".into()))
    }
}

impl futures::Stream for ChatStream {
    type Item = ChatEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ChatEvent>> {
        self.rx.poll_recv(cx)
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
    pub(crate) fn recall(
        &self,
        conv: &Conversation,
        vector: &[f32],
        exclude: &HashSet<u64>,
    ) -> Result<Vec<Recalled>, ChatError> {
        let hits: Vec<Hit> = self.index.search(vector, self.opts.recall_k, &self.scope(conv), exclude);
        let mut out = Vec::new();
        for h in hits.into_iter().filter(|h| h.score >= self.opts.recall_min_score) {
            if let Some(m) = self.store.message(&h.conversation_id, h.id)? {
                out.push(Recalled { id: m.id, role: m.role, content: m.content, score: h.score });
            }
        }
        Ok(out)
    }

    fn validate(&self, text: &str) -> Result<(), ChatError> {
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
        let conv = match msg.conversation_id {
            Some(id) => self.store.conversation(&id)?,
            None => self.store.create_conversation(msg.namespace.as_deref().unwrap_or("default")).await?,
        };
        let guard = self.lock(conv.id).await;

        let vector = self.embedder.embed_one(&msg.text).await.map_err(ChatError::Embedding)?;
        let recent = self.store.recent(&conv.id, self.opts.recent_messages)?;
        let exclude: HashSet<u64> = recent.iter().map(|m| m.id).collect();
        let recalled = self.recall(&conv, &vector, &exclude)?;
        let engine = self.pool.engine().clone();
        let recent_turns: Vec<ChatMessage> =
            recent.iter().map(|m| ChatMessage::new(m.role, m.content.clone())).collect();
        let budget = PromptBudget { n_ctx: self.pool.options().instance.n_ctx, max_tokens: sampling.max_tokens };
        let built = build_prompt(&self.opts.system_prompt, recalled.clone(), &recent_turns, &msg.text, budget, &|m| {
            engine.count_prompt_tokens(m)
        })?;
        let recalled: Vec<Recalled> = recalled.into_iter().filter(|r| built.recalled.contains(&r.id)).collect();

        // Admission before anything is stored: a rejected turn leaves no trace.
        let generation = self.pool.generate(GenerateRequest { messages: built.messages.clone(), sampling }).await?;
        let user_tokens = engine.count_tokens(&msg.text);
        let user_msg = self.store.append(&conv, Role::User, &msg.text, user_tokens, &vector).await?;
        self.index.insert(user_msg.id, conv.id, &conv.namespace, vector);

        let (tx, rx) = unbounded_channel();
        let turn = Turn { core: self.clone(), conv: conv.clone(), user_msg, recalled, prompt: built.messages };
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
}

impl Turn {
    async fn stream(
        self,
        mut generation: crate::lease::GenerationStream,
        tx: UnboundedSender<ChatEvent>,
        _lock: TurnLock,
    ) {
        let mut text = String::new();
        let mut client_gone = false;
        let mut outcome: Result<Completion, ChatError> = Err(ChatError::Store("generation ended early".into()));
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
        let msg = core.store.append(&self.conv, Role::Assistant, text, tokens, &vector).await?;
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
        })
    }
}

/// Sends a user message; starts a new conversation when `conversation_id` is none.
#[derive(Message, Clone, Debug)]
#[rtype(result = "Result<ChatStream, ChatError>")]
pub struct SendMessage {
    pub conversation_id: Option<ConversationId>,
    /// Namespace (user or tenant) of a new conversation.
    pub namespace: Option<String>,
    pub text: String,
    /// Sampling for this turn; none uses the configured defaults.
    pub sampling: Option<SamplingParams>,
}

/// Deletes a conversation with its messages and vectors; returns how many messages went.
#[derive(Message)]
#[rtype(result = "Result<usize, ChatError>")]
pub struct DeleteConversation(pub ConversationId);

pub struct ChatActor {
    core: Arc<ChatCore>,
}

impl ChatActor {
    pub(crate) fn new(core: Arc<ChatCore>) -> Self {
        Self { core }
    }
}

impl Actor for ChatActor {
    type Context = Context<Self>;
}

impl Handler<SendMessage> for ChatActor {
    type Result = ResponseFuture<Result<ChatStream, ChatError>>;

    fn handle(&mut self, msg: SendMessage, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.core.clone().send(msg))
    }
}

impl Handler<DeleteConversation> for ChatActor {
    type Result = ResponseFuture<Result<usize, ChatError>>;

    fn handle(&mut self, msg: DeleteConversation, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        Box::pin(async move { core.delete(msg.0).await })
    }
}

/// Stops the chat actor (the store closes when the last handle is dropped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopChat;

impl Handler<StopChat> for ChatActor {
    type Result = ();

    fn handle(&mut self, _: StopChat, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
