//! One model instance as the pool sees it: an actor that is the handle of the
//! instance's step-loop thread (which owns the llama.cpp context). It forwards
//! sequences and cancellations to the loop and answers `Describe` and `Probe`
//! without waiting for any generation to end.

use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::engine::step_loop::{Command, LoopSender};
#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{CacheKey, InstanceInfo, SeqSink};
use crate::error::EngineError;
use crate::params::PreparedRequest;

/// Starts a sequence in one slot; its events go to `sink`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate {
    pub slot: usize,
    pub request: PreparedRequest,
    /// Whose cache the prompt may reuse.
    pub key: CacheKey,
    /// When the request arrived at the instance (its timings start here).
    pub started: Instant,
    pub sink: SeqSink,
}

/// Ends one slot's sequence as cancelled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelSlot(pub usize);

/// Health probe: a cheap real decode between steps, on an idle slot's sequence (its cache is kept).
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Probe;

/// Reports the instance's weights address and memory.
#[derive(Message)]
#[rtype(result = "InstanceInfo")]
pub struct Describe;

/// Stops the handle; the loop ends once its current step returns.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Test hook: the next decode fails, panics or stalls.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectFault(pub Fault);

/// Sent to the pool when an instance's loop ends (a broken context, a panic,
/// or its retirement).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstanceStopped {
    pub id: usize,
    pub generation: u64,
}

pub struct ModelActor {
    id: usize,
    commands: LoopSender,
    info: InstanceInfo,
}

impl ModelActor {
    pub fn new(id: usize, commands: LoopSender, info: InstanceInfo) -> Self {
        Self { id, commands, info }
    }
}

impl Actor for ModelActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::debug!(instance = self.id, "instance handle stopped; its loop ends and frees the context");
    }
}

impl Handler<Generate> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: Generate, _: &mut Self::Context) {
        // If the loop is gone the sink is dropped here: the lease sees the
        // stream end without a result and reports the instance broken.
        self.commands.send(Command::Start {
            slot: msg.slot,
            request: msg.request,
            key: msg.key,
            started: msg.started,
            sink: msg.sink,
        });
    }
}

impl Handler<CancelSlot> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: CancelSlot, _: &mut Self::Context) {
        self.commands.send(Command::Cancel(msg.0));
    }
}

impl Handler<Probe> for ModelActor {
    type Result = ResponseFuture<Result<(), EngineError>>;

    fn handle(&mut self, _: Probe, _: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let sent = self.commands.send(Command::Probe(tx));
        Box::pin(async move {
            if !sent {
                return Err(EngineError::Decode("the instance's loop has ended".into()));
            }
            rx.await.unwrap_or_else(|_| Err(EngineError::Decode("the instance's loop ended during the probe".into())))
        })
    }
}

impl Handler<Describe> for ModelActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.info.clone())
    }
}

impl Handler<Retire> for ModelActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<InjectFault> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: InjectFault, _: &mut Self::Context) {
        self.commands.send(Command::Fault(msg.0));
    }
}
