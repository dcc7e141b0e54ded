//! One model instance: an actor that owns an [`InstanceBackend`] (a llama.cpp
//! context on the shared weights). Each runs on its own arbiter thread, so its
//! blocking decode loop never touches the executor that serves requests.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{InstanceBackend, InstanceInfo};
use crate::error::EngineError;
use crate::pool::lease::GenEvent;
use crate::params::{Completion, GenerateRequest};

/// Runs one generation; text pieces go to `sink` as they are produced.
#[derive(Message)]
#[rtype(result = "Result<Completion, EngineError>")]
pub struct Generate {
    pub request: GenerateRequest,
    pub sink: UnboundedSender<GenEvent>,
    /// Set by the watchdog to stop the loop before the next token.
    pub cancel: Arc<AtomicBool>,
    /// The request's span, so the decode loop logs inside it.
    pub span: tracing::Span,
}

/// Health probe: a cheap real decode.
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Probe;

/// Reports the instance's weights address and memory.
#[derive(Message)]
#[rtype(result = "InstanceInfo")]
pub struct Describe;

/// Test hook: the next decode fails, panics or stalls.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectFault(pub Fault);

/// Sent to the pool when an instance actor stops (including after a panic).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstanceStopped {
    pub id: usize,
    pub generation: u64,
}

pub struct ModelActor {
    id: usize,
    generation: u64,
    backend: Box<dyn InstanceBackend>,
    on_stop: Recipient<InstanceStopped>,
}

impl ModelActor {
    pub fn new(
        id: usize,
        generation: u64,
        backend: Box<dyn InstanceBackend>,
        on_stop: Recipient<InstanceStopped>,
    ) -> Self {
        Self { id, generation, backend, on_stop }
    }
}

impl Actor for ModelActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::debug!(instance = self.id, generation = self.generation, "model instance stopped; context freed");
        self.on_stop.do_send(InstanceStopped { id: self.id, generation: self.generation });
    }
}

impl Handler<Generate> for ModelActor {
    type Result = Result<Completion, EngineError>;

    fn handle(&mut self, msg: Generate, _: &mut Self::Context) -> Self::Result {
        let _in_request = msg.span.enter();
        let sink = msg.sink;
        // An empty piece is a liveness check: a dropped receiver cancels.
        let mut emit = |text: &str| {
            if text.is_empty() {
                !sink.is_closed()
            } else {
                sink.send(GenEvent::Token(text.to_string())).is_ok()
            }
        };
        let result = self.backend.generate(&msg.request, &mut emit, &msg.cancel);
        if let Ok(done) = &result {
            let u = &done.usage;
            tracing::debug!(
                instance = self.id,
                prompt_tokens = u.prompt_tokens,
                completion_tokens = u.completion_tokens,
                time_to_first_token_ms = u.time_to_first_token_ms,
                total_ms = u.total_ms,
                finish = ?done.finish_reason,
                "generation finished"
            );
        }
        result
    }
}

impl Handler<Probe> for ModelActor {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, _: Probe, _: &mut Self::Context) -> Self::Result {
        self.backend.probe()
    }
}

impl Handler<Describe> for ModelActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.backend.info())
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<InjectFault> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: InjectFault, _: &mut Self::Context) {
        self.backend.inject_fault(msg.0);
    }
}
