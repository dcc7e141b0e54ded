//! A lease on one sequence slot of one instance: a guard that returns the
//! slot to the pool when dropped, however the request ended, plus the token
//! stream a generation produces.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::engine::{CacheKey, SeqEnd, SeqEndWatch, SeqEvent, SeqEvents, SeqSink};
use crate::error::PoolError;
use crate::params::{Completion, PreparedRequest};
use crate::pool::instance::{CancelSlot, Generate, ModelActor};
use crate::pool::state::{LeaseId, Outcome};
use actix::{Addr, Message, Recipient};
use futures::{Future, Stream};

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

/// A lease ended (sent by the lease guard's `Drop` to the pool manager).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub instance: usize,
    pub slot: usize,
    pub lease: LeaseId,
    pub outcome: Outcome,
}

/// The right to use one sequence slot of one instance's context.
/// Dropping it returns the slot to the pool: a lease cannot leak.
pub struct Lease {
    pub(crate) instance: usize,
    /// Sequence slot inside the instance's context.
    pub(crate) slot: usize,
    pub(crate) id: LeaseId,
    pub(crate) addr: Addr<ModelActor>,
    /// Where the lease's end goes (the pool manager).
    pub(crate) pool: Recipient<Release>,
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
    pub fn run(self, request: PreparedRequest, max_generation: Duration) -> GenerationStream {
        let key = CacheKey::of_messages("", &request.request().messages);
        self.run_keyed(request, key, max_generation)
    }

    /// [`Self::run`] for the conversation `key`: the prompt may reuse that
    /// conversation's parked cache and its namespace's slots, nothing else.
    /// The stream reads the sequence's own bounded channel from the
    /// instance's step loop: no task relays its tokens, and a reader that
    /// lags pauses its own sequence only. The lease itself is watched apart
    /// from the stream ([`watch_end`]): it comes back when the sequence ends,
    /// however it ends, even while nobody polls the stream (actix stops
    /// polling a response body whose socket does not drain).
    pub fn run_keyed(self, request: PreparedRequest, key: CacheKey, max_generation: Duration) -> GenerationStream {
        let (sink, events) = SeqSink::channel();
        let ended = sink.ended();
        let (instance, slot) = (self.instance, self.slot);
        self.addr.do_send(Generate { slot, request, key, started: Instant::now(), sink });
        let waited_ms = self.waited.as_secs_f64() * 1e3;
        let held = Arc::new(Held { lease: Mutex::new(Some(self)), overran: AtomicBool::new(false) });
        // A task of the runtime, not of an actix arbiter: an embedding
        // application may run the pool from plain tokio.
        tokio::spawn(watch_end(held.clone(), ended, max_generation));
        GenerationStream {
            events,
            held,
            finished: false,
            waited_ms,
            deadline: Box::pin(tokio::time::sleep(max_generation)),
            max_generation,
            instance,
            slot,
        }
    }

    /// Past `max_generation`: cancel the sequence; an instance whose loop does
    /// not end it within the grace period is stuck and gets replaced (the
    /// lease is released with that outcome).
    async fn overran(mut self, mut ended: SeqEndWatch, max_generation: Duration) {
        let limit_ms = max_generation.as_millis() as u64;
        self.addr.do_send(CancelSlot(self.slot));
        let stopped = tokio::time::timeout(CANCEL_GRACE, ended.wait_for(Option::is_some)).await;
        self.outcome = Some(match stopped {
            Ok(Ok(_)) => Outcome::Ok { tokens: 0 },
            _ => Outcome::InstanceFault {
                reason: format!(
                    "generation ran past max_generation_ms ({limit_ms} ms) and did not stop within {} ms",
                    CANCEL_GRACE.as_millis()
                ),
            },
        });
    }
}

/// The lease of a running sequence, shared by its stream and its watcher:
/// whichever sees the end first gives the slot back (once).
struct Held {
    lease: Mutex<Option<Lease>>,
    /// The generation ran past `max_generation`: the watcher cancels it
    /// and keeps the lease until the loop has stopped it.
    overran: AtomicBool,
}

impl Held {
    fn take(&self) -> Option<Lease> {
        self.lease.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// The outcome a sequence's end gives its lease.
fn outcome_of(end: &SeqEnd) -> Outcome {
    match end {
        SeqEnd::Ok(tokens) => Outcome::Ok { tokens: u64::from(*tokens) },
        SeqEnd::Failed { instance_fault: true, reason } => Outcome::InstanceFault { reason: reason.clone() },
        SeqEnd::Failed { .. } => Outcome::Ok { tokens: 0 },
    }
}

/// Gives the lease back when its sequence ends (finished, cancelled,
/// paused past its limit, refused, failed), or cancels the sequence at
/// `max_generation`; the stream's reader plays no part.
async fn watch_end(held: Arc<Held>, mut ended: SeqEndWatch, max_generation: Duration) {
    let end = tokio::time::timeout(max_generation, async {
        ended.wait_for(Option::is_some).await.map(|end| end.clone().expect("waited for a value"))
    })
    .await;
    match end {
        Ok(Ok(end)) => {
            if let Some(mut lease) = held.take() {
                lease.outcome = Some(outcome_of(&end));
            }
        }
        Ok(Err(_)) => {
            if let Some(mut lease) = held.take() {
                let reason = "the instance's loop died during the request (panic or failed context)".to_string();
                lease.outcome = Some(Outcome::InstanceFault { reason });
            }
        }
        Err(_) => {
            held.overran.store(true, Ordering::SeqCst);
            let limit_ms = max_generation.as_millis() as u64;
            if let Some(lease) = held.take() {
                tracing::warn!(
                    instance = lease.instance,
                    limit_ms,
                    "generation ran past max_generation_ms; cancelling it"
                );
                lease.overran(ended, max_generation).await;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let outcome = self.outcome.take().unwrap_or(Outcome::Ok { tokens: 0 });
        self.pool.do_send(Release { instance: self.instance, slot: self.slot, lease: self.id, outcome });
    }
}

/// The text of one generation as it is produced, read straight from the
/// sequence's channel. Its lease goes back when the sequence ends (whether
/// or not this stream is polled) or when the stream is dropped (which also
/// cancels the sequence at the instance's next step). Past `max_generation`
/// it ends with [`PoolError::GenerationTimeout`].
pub struct GenerationStream {
    events: SeqEvents,
    held: Arc<Held>,
    finished: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    max_generation: Duration,
    waited_ms: f64,
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
        use futures::StreamExt;
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event {
                GenEvent::Token(t) => text.push_str(&t),
                GenEvent::Logprob(lp) => logprobs.push(lp),
                GenEvent::Done(c) => return Ok((text, logprobs, c)),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(PoolError::InstanceFailed { instance: self.instance, reason: "stream ended without a result".into() })
    }

    /// The stream's last event (the lease, if still here, goes back with `outcome`).
    fn end(&mut self, event: GenEvent, outcome: Option<Outcome>) -> Poll<Option<GenEvent>> {
        self.finished = true;
        let event = if self.held.overran.load(Ordering::SeqCst) {
            GenEvent::Error(PoolError::GenerationTimeout { limit_ms: self.max_generation.as_millis() as u64 })
        } else {
            if let Some(mut lease) = self.held.take() {
                lease.outcome = outcome;
            }
            event
        };
        if let GenEvent::Error(e) = &event {
            tracing::warn!(instance = self.instance, slot = self.slot, error = %e, "generation failed");
        }
        Poll::Ready(Some(event))
    }
}

impl Drop for GenerationStream {
    /// The reader left: the slot goes back now (the loop cancels the
    /// sequence at its next step), unless the watcher holds it to see an
    /// overrun sequence stop.
    fn drop(&mut self) {
        if !self.held.overran.load(Ordering::SeqCst) {
            drop(self.held.take());
        }
    }
}

impl Stream for GenerationStream {
    type Item = GenEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenEvent>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match this.events.poll_recv(cx) {
            Poll::Ready(Some(SeqEvent::Piece(text))) => return Poll::Ready(Some(GenEvent::Token(text))),
            Poll::Ready(Some(SeqEvent::Logprob(lp))) => return Poll::Ready(Some(GenEvent::Logprob(lp))),
            Poll::Ready(Some(SeqEvent::Done(result))) => {
                return match result {
                    Ok(mut done) => {
                        done.usage.queue_wait_ms = this.waited_ms;
                        let outcome = Outcome::Ok { tokens: done.usage.completion_tokens as u64 };
                        this.end(GenEvent::Done(done), Some(outcome))
                    }
                    Err(e) if e.is_instance_fault() => {
                        let outcome = Outcome::InstanceFault { reason: e.to_string() };
                        let error = PoolError::InstanceFailed { instance: this.instance, reason: e.to_string() };
                        this.end(GenEvent::Error(error), Some(outcome))
                    }
                    Err(e) => this.end(GenEvent::Error(e.into()), None),
                };
            }
            Poll::Ready(None) => {
                let reason = "the instance's loop died during the request (panic or failed context)".to_string();
                let outcome = Outcome::InstanceFault { reason: reason.clone() };
                let instance = this.instance;
                return this.end(GenEvent::Error(PoolError::InstanceFailed { instance, reason }), Some(outcome));
            }
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            // The reader hears at the limit; the watcher cancels the
            // sequence and gives the slot back once the loop has stopped it.
            this.held.overran.store(true, Ordering::SeqCst);
            let limit_ms = this.max_generation.as_millis() as u64;
            return this.end(GenEvent::Error(PoolError::GenerationTimeout { limit_ms }), None);
        }
        Poll::Pending
    }
}
