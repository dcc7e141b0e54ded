//! The chat actor: the registry of the conversations' actors. Every turn,
//! delete and recall of a conversation comes here first; it starts the
//! conversation's actor (`chat/conversation.rs`) when the conversation has
//! none, hands it the work (its mailbox orders the conversation's work), and
//! forgets it when its work is done, so that an idle conversation holds no
//! actor. It runs on the chat arbiter (`ChatHandle::start_on`), and so do the
//! conversations' actors it starts.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::chat::conversation::{ConversationActor, Delete, Recall, RunTurn, TurnReply, WorkDone};
use crate::chat::turn::{ChatCore, TurnRequest};
use crate::chat::types::ChatError;
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::{Conversation, ConversationId};

/// The conversations with work running or waiting, each with its actor.
/// The registry's decisions, apart from actix (`A` is the actor's address).
struct Conversations<A> {
    active: HashMap<ConversationId, Active<A>>,
    next_serial: u64,
}

struct Active<A> {
    actor: A,
    serial: u64,
    /// Work handed to the actor and not done yet (running or in its mailbox).
    pending: usize,
}

impl<A> Default for Conversations<A> {
    fn default() -> Self {
        Self { active: HashMap::new(), next_serial: 0 }
    }
}

impl<A> Conversations<A> {
    /// Work for conversation `id`: the actor to hand it to, and whether it
    /// waits for the conversation's earlier work. An actor is started
    /// (`start`, given its serial) when the conversation has none, or when
    /// its actor is no longer `alive` (it panicked: its work is lost).
    fn enqueue(&mut self, id: ConversationId, alive: impl Fn(&A) -> bool, start: impl FnOnce(u64) -> A) -> (&A, bool) {
        let next_serial = &mut self.next_serial;
        let fresh = || {
            *next_serial += 1;
            Active { actor: start(*next_serial), serial: *next_serial, pending: 0 }
        };
        let active = match self.active.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let active = e.into_mut();
                if !alive(&active.actor) {
                    *active = fresh();
                }
                active
            }
            std::collections::hash_map::Entry::Vacant(e) => e.insert(fresh()),
        };
        active.pending += 1;
        (&active.actor, active.pending > 1)
    }

    /// The actor `serial` of conversation `id` finished a piece of work.
    /// Returns the actor when that was its last: it is forgotten (and stops,
    /// its address gone). A report from an actor already replaced is ignored.
    fn done(&mut self, id: ConversationId, serial: u64) -> Option<A> {
        let active = self.active.get_mut(&id).filter(|a| a.serial == serial)?;
        active.pending = active.pending.saturating_sub(1);
        if active.pending > 0 {
            return None;
        }
        self.active.remove(&id).map(|a| a.actor)
    }

    /// Conversations with an actor.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.active.len()
    }
}

pub struct ChatActor {
    core: Arc<ChatCore>,
    conversations: Conversations<Addr<ConversationActor>>,
}

impl ChatActor {
    pub(crate) fn new(core: Arc<ChatCore>) -> Self {
        Self { core, conversations: Conversations::default() }
    }

    /// The actor of conversation `id`, started here (on the chat arbiter)
    /// when it has none; and whether the new work waits for earlier work.
    fn enqueue(&mut self, id: ConversationId, ctx: &mut Context<Self>) -> (Addr<ConversationActor>, bool) {
        let (core, registry) = (self.core.clone(), ctx.address().downgrade().recipient());
        let (actor, queued) = self
            .conversations
            .enqueue(id, Addr::connected, |serial| ConversationActor::new(id, serial, core, registry).start());
        (actor.clone(), queued)
    }
}

impl Actor for ChatActor {
    type Context = Context<Self>;
}

/// Starts a turn: its conversation's actor runs it once the conversation's
/// earlier work is over. Answers whether the turn waits for that work (the
/// caller counts such a wait as a queued request).
#[derive(Message)]
#[rtype(result = "bool")]
pub(crate) struct StartTurn {
    pub(crate) turn: TurnRequest,
    pub(crate) started: oneshot::Sender<()>,
    pub(crate) reply: TurnReply,
}

impl Handler<StartTurn> for ChatActor {
    type Result = bool;

    fn handle(&mut self, msg: StartTurn, ctx: &mut Self::Context) -> bool {
        let StartTurn { mut turn, started, reply } = msg;
        // A new conversation gets its id (and its actor) here: a turn sent
        // with that id while this one runs waits for it.
        let id = match turn.msg.conversation_id {
            Some(id) => id,
            None => {
                let conv = Conversation::new(turn.msg.namespace.as_deref().unwrap_or("default"));
                let id = conv.id;
                turn.new = Some(conv);
                id
            }
        };
        let (actor, queued) = self.enqueue(id, ctx);
        actor.do_send(RunTurn { turn, started, reply });
        queued
    }
}

/// Deletes a conversation with its messages and vectors; returns how many messages went.
#[derive(Message)]
#[rtype(result = "Result<usize, ChatError>")]
pub struct DeleteConversation(pub ConversationId);

impl Handler<DeleteConversation> for ChatActor {
    type Result = ResponseFuture<Result<usize, ChatError>>;

    fn handle(&mut self, msg: DeleteConversation, ctx: &mut Self::Context) -> Self::Result {
        let (reply, deleted) = oneshot::channel();
        let (actor, _) = self.enqueue(msg.0, ctx);
        actor.do_send(Delete { reply });
        Box::pin(async move { deleted.await.map_err(|_| ChatError::Stopped)? })
    }
}

/// What memory would recall for a vector in a conversation, after the
/// conversation's earlier turns.
#[derive(Message)]
#[rtype(result = "Result<Vec<Recalled>, ChatError>")]
pub(crate) struct RecallIn {
    pub(crate) conv: Conversation,
    pub(crate) vector: Vec<f32>,
}

impl Handler<RecallIn> for ChatActor {
    type Result = ResponseFuture<Result<Vec<Recalled>, ChatError>>;

    fn handle(&mut self, msg: RecallIn, ctx: &mut Self::Context) -> Self::Result {
        let (reply, recalled) = oneshot::channel();
        let (actor, _) = self.enqueue(msg.conv.id, ctx);
        actor.do_send(Recall { conv: msg.conv, vector: msg.vector, reply });
        Box::pin(async move { recalled.await.map_err(|_| ChatError::Stopped)? })
    }
}

impl Handler<WorkDone> for ChatActor {
    type Result = ();

    fn handle(&mut self, msg: WorkDone, _: &mut Self::Context) {
        // Its last: its address goes, and it stops once its mailbox is empty (it is).
        drop(self.conversations.done(msg.id, msg.serial));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversations_work_queues_behind_its_earlier_work_and_its_actor_goes_when_idle() {
        let mut conversations = Conversations::<u64>::default();
        let (a, b) = (ConversationId::new_v4(), ConversationId::new_v4());
        let alive = |_: &u64| true;
        let (&first, queued) = conversations.enqueue(a, alive, |serial| serial);
        assert!(!queued, "the first work of a conversation runs at once");
        let (&again, queued) = conversations.enqueue(a, alive, |_| unreachable!("one actor per conversation"));
        assert!(queued && again == first, "the second waits, in the same actor");
        let (&other, queued) = conversations.enqueue(b, alive, |serial| serial);
        assert!(!queued && other != first, "another conversation has its own actor");
        assert_eq!(conversations.len(), 2);

        assert_eq!(conversations.done(a, first), None, "one piece of work is left");
        assert_eq!(conversations.done(a, first), Some(first), "idle: forgotten");
        assert_eq!(conversations.done(b, other), Some(other));
        assert_eq!(conversations.len(), 0, "no actor is kept for an idle conversation");

        // Work after that starts a fresh actor, which a late report of the old one does not touch.
        let (&fresh, queued) = conversations.enqueue(a, alive, |serial| serial);
        assert!(!queued && fresh != first);
        assert_eq!(conversations.done(a, first), None);
        assert_eq!(conversations.len(), 1);
    }

    #[test]
    fn a_dead_actor_is_replaced_and_its_work_is_not_waited_for() {
        let mut conversations = Conversations::<u64>::default();
        let id = ConversationId::new_v4();
        let (&dead, _) = conversations.enqueue(id, |_| true, |serial| serial);
        conversations.enqueue(id, |_| true, |_| unreachable!());
        let (&fresh, queued) = conversations.enqueue(id, |actor| *actor != dead, |serial| serial);
        assert!(!queued && fresh != dead, "work given to a dead actor is lost, not waited for");
        assert_eq!(conversations.done(id, fresh), Some(fresh));
    }
}
