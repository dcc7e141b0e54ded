//! The actor of one conversation: its mailbox orders the conversation's
//! turns, deletes and recalls. The chat actor (`chat/actor.rs`) starts it
//! when the conversation gets work and forgets it when the work is done, so
//! only conversations with a turn running or waiting have one (no timers).
//!
//! Each message is handled with the actor held ([`AtomicResponse`]): a turn
//! holds it until the turn is over, its reply stored and embedded (the
//! second half, driven by whoever reads the `ChatStream`) or
//! the turn given up. Where it runs: on the chat arbiter, the thread the
//! chat actor started it on; between awaits a turn does only light work
//! there, the blocking parts (tokenizing, recall's search, the store) are on
//! blocking threads.

use std::future::Future;
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakRecipient;
use tokio::sync::oneshot;

use crate::chat::turn::{ChatCore, Generating, TurnOver, TurnRequest};
use crate::chat::types::ChatError;
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::{Conversation, ConversationId};

/// Where a turn's caller gets the turn once it has begun (or why it could
/// not); a caller that drops it has left, and the turn is given up.
pub(crate) type TurnReply = oneshot::Sender<Result<Box<Generating>, ChatError>>;

pub(crate) struct ConversationActor {
    id: ConversationId,
    /// Tells this actor apart from an earlier or later one of the same
    /// conversation, in the chat actor's registry.
    serial: u64,
    core: Arc<ChatCore>,
    /// The chat actor (the registry), told when a piece of work is done.
    /// Weak: it holds this actor's address while it has work, and stops
    /// when its handles are gone.
    registry: WeakRecipient<WorkDone>,
}

impl ConversationActor {
    pub(crate) fn new(id: ConversationId, serial: u64, core: Arc<ChatCore>, registry: WeakRecipient<WorkDone>) -> Self {
        Self { id, serial, core, registry }
    }

    /// Runs `work` with the actor held (the conversation's next message waits
    /// for it), then tells the registry that one piece of work is done.
    fn hold(&self, work: impl Future<Output = ()> + 'static) -> AtomicResponse<Self, ()> {
        let (registry, id, serial) = (self.registry.clone(), self.id, self.serial);
        AtomicResponse::new(Box::pin(
            async move {
                work.await;
                if let Some(registry) = registry.upgrade() {
                    registry.do_send(WorkDone { id, serial });
                }
            }
            .into_actor(self),
        ))
    }
}

impl Actor for ConversationActor {
    type Context = Context<Self>;
}

/// A conversation's actor finished a piece of work (sent to the chat actor,
/// which forgets the actor when that was its last).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct WorkDone {
    pub(crate) id: ConversationId,
    pub(crate) serial: u64,
}

/// Runs a turn of this conversation, its earlier work being over.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RunTurn {
    pub(crate) turn: TurnRequest,
    /// Told when the turn begins (the end of the wait for earlier turns).
    pub(crate) started: oneshot::Sender<()>,
    pub(crate) reply: TurnReply,
}

impl Handler<RunTurn> for ConversationActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: RunTurn, _: &mut Self::Context) -> Self::Result {
        let RunTurn { turn, started, mut reply } = msg;
        let (core, id) = (self.core.clone(), self.id);
        self.hold(async move {
            let _ = started.send(());
            // Its caller left while it waited (timed out, or the client went).
            if reply.is_closed() {
                return;
            }
            let (over, turn_over) = TurnOver::new();
            let begun = tokio::select! {
                begun = core.begin_turn(id, turn, over) => begun,
                // The caller left during the first half: dropping it gives
                // the turn up (the pool's queue place included); nothing is stored.
                () = reply.closed() => return,
            };
            // Sent back, the turn's second half is driven by the caller's
            // reads; not sent (the caller left just now), it is dropped here,
            // which stops the generation and stores nothing.
            let _ = reply.send(begun);
            let _ = turn_over.await;
        })
    }
}

/// Deletes this conversation once its earlier turns are over.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Delete {
    pub(crate) reply: oneshot::Sender<Result<usize, ChatError>>,
}

impl Handler<Delete> for ConversationActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Delete, _: &mut Self::Context) -> Self::Result {
        let (core, id) = (self.core.clone(), self.id);
        // Run to the end even if its caller left, as an acknowledged request is.
        self.hold(async move {
            let _ = msg.reply.send(core.delete(id).await);
        })
    }
}

/// What memory would recall in this conversation, once its earlier turns
/// (their replies' embeddings included) are over.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Recall {
    pub(crate) conv: Conversation,
    pub(crate) vector: Vec<f32>,
    pub(crate) reply: oneshot::Sender<Result<Vec<Recalled>, ChatError>>,
}

impl Handler<Recall> for ConversationActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Recall, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        self.hold(async move {
            if !msg.reply.is_closed() {
                let _ = msg.reply.send(core.recall_now(&msg.conv, &msg.vector).await);
            }
        })
    }
}
