//! A lease on one sequence slot of one instance: a guard that returns the
//! slot to the pool when dropped, however the request ended, plus the token
//! stream a generation produces.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix::Addr;
use futures::Stream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::{CacheKey, SeqEvent};
use crate::error::{EngineError, PoolError};
use crate::params::{Completion, GenerateRequest};
use crate::pool::instance::{CancelSlot, Generate, ModelActor};
use crate::pool::manager::{PoolManager, Release};
use crate::pool::state::{LeaseId, Outcome};

/// What a generation stream yields: text pieces, then exactly one `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum GenEvent {
    Token(String),
    /// A token's log-probabilities, before the text that carries it.
    Logprob(crate::params::TokenLogprob),
    Done(Completion),
    Error(PoolError),
}

/// How long a generation past `max_generation` may take to stop after it is
/// cancelled before its instance counts as stuck and is replaced.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// The right to use one sequence slot of one instance's context.
/// Dropping it returns the slot to the pool: a lease cannot leak.
pub struct Lease {
    pub(crate) instance: usize,
    /// Sequence slot inside the instance's context.
    pub(crate) slot: usize,
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

    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Runs `request` in the leased slot. The returned stream yields the
    /// text as it is produced; dropping it cancels the sequence at the
    /// instance's next step (between tokens or prompt chunks). A generation
    /// longer than `max_generation` is cancelled and answered with
    /// [`PoolError::GenerationTimeout`]; only an instance whose loop does not
    /// stop it within a grace period is replaced.
    pub fn run(self, request: GenerateRequest, max_generation: Duration) -> GenerationStream {
        let key = CacheKey::of_messages("", &request.messages);
        self.run_keyed(request, key, max_generation)
    }

    /// [`Self::run`] for the conversation `key`: the prompt may reuse that
    /// conversation's parked cache and its namespace's slots, nothing else.
    pub fn run_keyed(mut self, request: GenerateRequest, key: CacheKey, max_generation: Duration) -> GenerationStream {
        let (tx, rx) = unbounded_channel();
        let (sink, mut events) = unbounded_channel();
        let (instance, slot) = (self.instance, self.slot);
        let span = tracing::info_span!("generation", instance, slot, queue_wait_ms = self.waited.as_secs_f64() * 1e3);
        self.addr.do_send(Generate { slot, request, key, started: Instant::now(), sink });
        let waited_ms = self.waited.as_secs_f64() * 1e3;
        let task = async move {
            let deadline = tokio::time::sleep(max_generation);
            tokio::pin!(deadline);
            let event = loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(SeqEvent::Piece(text)) => {
                            // A client gone: `events` drops below and the loop cancels.
                            if tx.send(GenEvent::Token(text)).is_err() {
                                break None;
                            }
                        }
                        Some(SeqEvent::Logprob(lp)) => {
                            if tx.send(GenEvent::Logprob(lp)).is_err() {
                                break None;
                            }
                        }
                        Some(SeqEvent::Done(result)) => break Some(self.finished(result, waited_ms)),
                        None => {
                            let reason = "the instance's loop died during the request (panic or failed context)".to_string();
                            self.outcome = Some(Outcome::InstanceFault { reason: reason.clone() });
                            break Some(GenEvent::Error(PoolError::InstanceFailed { instance, reason }));
                        }
                    },
                    _ = tx.closed() => break None,
                    _ = &mut deadline => {
                        // The client hears at the limit; the slot comes back
                        // once the loop has stopped the sequence.
                        let limit_ms = max_generation.as_millis() as u64;
                        let _ = tx.send(GenEvent::Error(PoolError::GenerationTimeout { limit_ms }));
                        tracing::warn!(instance, limit_ms, "generation ran past max_generation_ms; cancelling it");
                        self.overran(&mut events, max_generation).await;
                        break None;
                    }
                }
            };
            if let Some(event) = event {
                if let GenEvent::Error(e) = &event {
                    tracing::warn!(instance, error = %e, "generation failed");
                }
                let _ = tx.send(event);
            }
            drop(events);
            drop(self);
        };
        actix::spawn(tracing::Instrument::instrument(task, span));
        GenerationStream { rx, instance, slot }
    }

    /// The sequence's result, as the stream's last event; notes the outcome.
    fn finished(&mut self, result: Result<Completion, EngineError>, waited_ms: f64) -> GenEvent {
        match result {
            Ok(mut done) => {
                done.usage.queue_wait_ms = waited_ms;
                self.outcome = Some(Outcome::Ok { tokens: done.usage.completion_tokens as u64 });
                GenEvent::Done(done)
            }
            Err(e) if e.is_instance_fault() => {
                self.outcome = Some(Outcome::InstanceFault { reason: e.to_string() });
                GenEvent::Error(PoolError::InstanceFailed { instance: self.instance, reason: e.to_string() })
            }
            Err(e) => GenEvent::Error(e.into()),
        }
    }

    /// Past `max_generation`: cancel the sequence; an instance whose loop does
    /// not end it within the grace period is stuck and gets replaced.
    async fn overran(&mut self, events: &mut tokio::sync::mpsc::UnboundedReceiver<SeqEvent>, max_generation: Duration) {
        let limit_ms = max_generation.as_millis() as u64;
        self.addr.do_send(CancelSlot(self.slot));
        let stopped = tokio::time::timeout(CANCEL_GRACE, async {
            while let Some(event) = events.recv().await {
                if let SeqEvent::Done(_) = event {
                    return true;
                }
            }
            false
        })
        .await;
        self.outcome = Some(match stopped {
            Ok(true) => Outcome::Ok { tokens: 0 },
            _ => Outcome::InstanceFault {
                reason: format!(
                    "generation ran past max_generation_ms ({limit_ms} ms) and did not stop within {} ms",
                    CANCEL_GRACE.as_millis()
                ),
            },
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Ok { tokens: 0 });
        self.pool.do_send(Release { instance: self.instance, slot: self.slot, lease: self.id, outcome });
    }
}

/// The text of one generation as it is produced.
pub struct GenerationStream {
    rx: UnboundedReceiver<GenEvent>,
    instance: usize,
    slot: usize,
}

impl GenerationStream {
    /// The instance serving this generation.
    pub fn instance(&self) -> usize {
        self.instance
    }

    /// The sequence slot of that instance.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Waits for the whole text.
    pub async fn collect_text(self) -> Result<(String, Completion), PoolError> {
        self.collect().await.map(|(text, _, done)| (text, done))
    }

    /// Waits for the whole text and each token's log-probabilities (when the
    /// request asked for them).
    pub async fn collect(mut self) -> Result<(String, Vec<crate::params::TokenLogprob>, Completion), PoolError> {
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        while let Some(event) = self.rx.recv().await {
            match event {
                GenEvent::Token(t) => text.push_str(&t),
                GenEvent::Logprob(lp) => logprobs.push(lp),
                GenEvent::Done(c) => return Ok((text, logprobs, c)),
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
