//! A lease on one instance: a guard that returns the instance to the pool
//! when dropped, however the request ended, plus the token stream a
//! generation produces.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix::Addr;
use futures::Stream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::PoolError;
use crate::pool::instance::{Generate, ModelActor};
use crate::params::{Completion, GenerateRequest};
use crate::pool::manager::{PoolManager, Release};
use crate::pool::state::{LeaseId, Outcome};

/// What a generation stream yields: text pieces, then exactly one `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum GenEvent {
    Token(String),
    Done(Completion),
    Error(PoolError),
}

/// The right to use one instance (and one sequence slot in its context).
/// Dropping it returns the instance to the pool: a lease cannot leak.
pub struct Lease {
    pub(crate) instance: usize,
    /// Sequence slot inside the instance's context (always 0 until batching).
    pub(crate) slot: u32,
    pub(crate) id: LeaseId,
    pub(crate) addr: Addr<ModelActor>,
    pub(crate) pool: Addr<PoolManager>,
    pub(crate) outcome: Option<Outcome>,
    /// How long the request waited in the queue for this lease.
    pub(crate) waited: Duration,
}

impl Lease {
    pub fn instance(&self) -> usize {
        self.instance
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Runs `request` on the leased instance. The returned stream yields the
    /// text as it is produced; dropping it cancels the generation within one
    /// token. A generation longer than `max_generation` is cut off, answered
    /// with [`PoolError::GenerationTimeout`], and the instance replaced.
    pub fn run(mut self, request: GenerateRequest, max_generation: Duration) -> GenerationStream {
        let (tx, rx) = unbounded_channel();
        let instance = self.instance;
        let cancel = Arc::new(AtomicBool::new(false));
        let span = tracing::info_span!("generation", instance, queue_wait_ms = self.waited.as_secs_f64() * 1e3);
        let msg = Generate { request, sink: tx.clone(), cancel: cancel.clone(), span: span.clone() };
        let addr = self.addr.clone();
        let waited_ms = self.waited.as_secs_f64() * 1e3;
        let task = async move {
            let event = match tokio::time::timeout(max_generation, addr.send(msg)).await {
                Ok(Ok(Ok(mut done))) => {
                    done.usage.queue_wait_ms = waited_ms;
                    self.outcome = Some(Outcome::Ok { tokens: done.usage.completion_tokens as u64 });
                    GenEvent::Done(done)
                }
                Ok(Ok(Err(e))) => {
                    self.outcome = Some(if e.is_instance_fault() {
                        Outcome::InstanceFault { reason: e.to_string() }
                    } else {
                        Outcome::Ok { tokens: 0 }
                    });
                    if e.is_instance_fault() {
                        GenEvent::Error(PoolError::InstanceFailed { instance, reason: e.to_string() })
                    } else {
                        GenEvent::Error(e.into())
                    }
                }
                Ok(Err(_)) => {
                    let reason = "the instance's thread died (panic)".to_string();
                    self.outcome = Some(Outcome::InstanceFault { reason: reason.clone() });
                    GenEvent::Error(PoolError::InstanceFailed { instance, reason })
                }
                Err(_) => {
                    cancel.store(true, Ordering::Relaxed);
                    let limit_ms = max_generation.as_millis() as u64;
                    self.outcome = Some(Outcome::InstanceFault {
                        reason: format!("generation ran past max_generation_ms ({limit_ms} ms)"),
                    });
                    GenEvent::Error(PoolError::GenerationTimeout { limit_ms })
                }
            };
            if let GenEvent::Error(e) = &event {
                tracing::warn!(instance, error = %e, "generation failed");
            }
            let _ = tx.send(event);
            drop(self);
        };
        actix::spawn(tracing::Instrument::instrument(task, span));
        GenerationStream { rx, instance }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Ok { tokens: 0 });
        self.pool.do_send(Release { instance: self.instance, lease: self.id, outcome });
    }
}

/// The text of one generation as it is produced.
pub struct GenerationStream {
    rx: UnboundedReceiver<GenEvent>,
    instance: usize,
}

impl GenerationStream {
    /// The instance serving this generation.
    pub fn instance(&self) -> usize {
        self.instance
    }

    /// Waits for the whole text.
    pub async fn collect_text(mut self) -> Result<(String, Completion), PoolError> {
        let mut text = String::new();
        while let Some(event) = self.rx.recv().await {
            match event {
                GenEvent::Token(t) => text.push_str(&t),
                GenEvent::Done(c) => return Ok((text, c)),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(PoolError::InstanceFailed { instance: self.instance, reason: "stream ended without a result".into() })
    }
}

impl Stream for GenerationStream {
    type Item = GenEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenEvent>> {
        self.rx.poll_recv(cx)
    }
}
