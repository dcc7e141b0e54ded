//! The chat actor: owns the chat layer's shared state for the actors that
//! deliver its messages (deleting a conversation, stopping). A turn's work
//! is in [`super::turn`]; its types in [`super::types`].

use std::sync::Arc;

use actix::prelude::*;

use crate::chat::turn::ChatCore;
use crate::chat::types::ChatError;
use crate::memory::store::ConversationId;

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

    /// The actor owns its arbiter (see `ChatHandle::start_on`).
    fn stopped(&mut self, _: &mut Self::Context) {
        Arbiter::current().stop();
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
