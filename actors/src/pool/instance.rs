//! One model instance: an actor on its own thread that owns the instance's
//! backend (a llama.cpp context with its batcher, or a remote llama-server).
//! Its mailbox is the one queue into the step loop: while sequences are
//! active the actor sends itself a [`Step`], one decode per message, and
//! whatever arrived meanwhile (`Generate`, `CancelSlot`, `Probe`,
//! `Describe`) is handled between two steps. The thread ends when the actor
//! stops: retired (the slots' caches are saved), its context broken, or a
//! panic in a handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{CacheKey, InstanceBackend, InstanceInfo, InstanceSource, ProbeReply, SeqSink, SlotStreams};
use crate::error::EngineError;
use crate::params::PreparedRequest;

/// How long the actor waits while every sequence is paused (their readers
/// lag) before it looks at them again.
const PAUSED_WAIT: Duration = Duration::from_millis(2);

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

/// Stops the instance once its current step returns; the slots' caches are saved.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Test hook: the next decode fails, panics or stalls.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectFault(pub Fault);

/// One decode step for every active sequence (sent by the actor to itself).
#[derive(Message)]
#[rtype(result = "()")]
struct Step;

/// Sent to the pool when an instance is up (its actor's address, what it
/// is, its slots' KV streams) or could not be created.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct InstanceUp {
    pub id: usize,
    pub generation: u64,
    pub result: Result<(Addr<ModelActor>, InstanceInfo, Arc<SlotStreams>), EngineError>,
}

/// Sent to the pool when an instance's actor is gone (a broken context, a
/// panic, or its retirement).
#[derive(Message)]
#[rtype(result = "()")]
pub struct InstanceStopped {
    pub id: usize,
    pub generation: u64,
}

/// Whether a step is on its way.
enum Stepping {
    Idle,
    /// A [`Step`] is in the context's queue.
    Queued,
    /// Every sequence was paused: a [`Step`] comes after [`PAUSED_WAIT`].
    Waiting(SpawnHandle),
}

pub struct ModelActor {
    id: usize,
    /// The context and its batcher (or the remote): only this actor touches it.
    backend: Box<dyn InstanceBackend>,
    info: InstanceInfo,
    stepping: Stepping,
    /// The context failed, or a call into it panicked (set around every
    /// call, so a panic leaves it set): nothing may touch it again, and its
    /// slots' caches are not saved.
    broken: bool,
    /// Last, so that the context is freed before the pool hears.
    _notice: StopNotice,
}

/// Tells the pool that an instance is gone when its actor is dropped:
/// after an orderly stop, and while a panic unwinds the thread.
struct StopNotice {
    id: usize,
    generation: u64,
    pool: Recipient<InstanceStopped>,
}

impl Drop for StopNotice {
    fn drop(&mut self) {
        self.pool.do_send(InstanceStopped { id: self.id, generation: self.generation });
    }
}

/// Starts instance `id` on a thread of its own: creates its backend there
/// (contexts borrow the shared weights; a remote connects), then runs its
/// actor on it until the actor stops. `up` hears the actor's address or the
/// creation error; `stopped` hears when an instance that came up is gone.
pub(crate) fn spawn(
    id: usize,
    generation: u64,
    source: InstanceSource,
    up: Recipient<InstanceUp>,
    stopped: Recipient<InstanceStopped>,
) -> std::io::Result<()> {
    // Each request's grammar is compiled and sampled on this thread, and
    // llama.cpp recurses over its rules, within the bounds of `engine::grammar`.
    let thread = std::thread::Builder::new().name(format!("instance-{id}"));
    thread.stack_size(crate::engine::grammar::PARSER_STACK_BYTES).spawn(move || {
        let report = |result| up.do_send(InstanceUp { id, generation, result });
        // What actix_rt's Runtime is: a one-thread tokio runtime and a
        // LocalSet (actix spawns with spawn_local). No System: an actor and
        // its timers need none.
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return report(Err(EngineError::Context(format!("the instance's runtime: {e}")))),
        };
        tokio::task::LocalSet::new().block_on(&runtime, async move {
            let backend = match source.create(id).await {
                Ok(b) => b,
                Err(e) => return report(Err(e)),
            };
            let ctx = Context::new();
            let (info, streams) = (backend.info(), backend.streams());
            report(Ok((ctx.address(), info.clone(), streams)));
            let notice = StopNotice { id, generation, pool: stopped };
            let actor = ModelActor { id, backend, info, stepping: Stepping::Idle, broken: false, _notice: notice };
            // `Actor::start` without its spawn: the actor runs as this
            // thread's own future, and the thread ends when it stops.
            ctx.into_future(actor).await;
        });
    })?;
    Ok(())
}

impl ModelActor {
    /// Runs `f` on the backend unless it is broken. A panic inside leaves
    /// `broken` set while the unwind drops the actor.
    #[inline]
    fn call<R>(&mut self, f: impl FnOnce(&mut dyn InstanceBackend) -> R) -> Option<R> {
        if self.broken {
            return None;
        }
        self.broken = true;
        let r = f(self.backend.as_mut());
        self.broken = false;
        Some(r)
    }

    /// Sends the next step now, unless one is queued already; a step
    /// waiting for paused readers comes at once (new work has arrived).
    fn step_now(&mut self, ctx: &mut Context<Self>) {
        match std::mem::replace(&mut self.stepping, Stepping::Queued) {
            Stepping::Queued => {}
            Stepping::Waiting(later) => {
                ctx.cancel_future(later);
                ctx.notify(Step);
            }
            Stepping::Idle if self.backend.active() > 0 => ctx.notify(Step),
            Stepping::Idle => self.stepping = Stepping::Idle,
        }
    }
}

impl Actor for ModelActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        if self.broken {
            tracing::debug!(instance = self.id, "instance stopped; its context is freed");
        } else {
            self.backend.close();
            tracing::debug!(instance = self.id, "instance stopped in order; its slots' caches are saved");
        }
    }
}

impl Handler<Step> for ModelActor {
    type Result = ();

    fn handle(&mut self, _: Step, ctx: &mut Self::Context) {
        self.stepping = Stepping::Idle;
        if self.broken || self.backend.active() == 0 {
            return;
        }
        match self.call(|b| b.step()) {
            None => {}
            Some(Ok(true)) => self.step_now(ctx),
            // Every sequence is paused (its reader lags): look again in a
            // moment, or as soon as new work arrives, not spin.
            Some(Ok(false)) => {
                if self.backend.active() > 0 {
                    self.stepping = Stepping::Waiting(ctx.notify_later(Step, PAUSED_WAIT));
                }
            }
            Some(Err(e)) => {
                tracing::error!(instance = self.id, error = %e, "the context failed; the instance stops");
                self.broken = true;
                ctx.stop();
            }
        }
    }
}

impl Handler<Generate> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: Generate, ctx: &mut Self::Context) {
        // A broken instance drops the sink: the lease sees the sequence end
        // without a result and reports the instance broken.
        let Generate { slot, request, key, started, sink } = msg;
        if self.call(|b| b.start(slot, request, key, started, sink)).is_some() {
            self.step_now(ctx);
        }
    }
}

impl Handler<CancelSlot> for ModelActor {
    type Result = ();

    fn handle(&mut self, msg: CancelSlot, _: &mut Self::Context) {
        self.call(|b| b.cancel(msg.0));
    }
}

impl Handler<Probe> for ModelActor {
    type Result = Response<Result<(), EngineError>>;

    fn handle(&mut self, _: Probe, _: &mut Self::Context) -> Self::Result {
        match self.call(|b| b.probe()) {
            Some(ProbeReply::Now(result)) => Response::reply(result),
            Some(ProbeReply::Later(answer)) => Response::fut(answer),
            None => Response::reply(Err(EngineError::Decode("the instance is broken".into()))),
        }
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
        self.call(|b| b.inject_fault(msg.0));
    }
}

#[cfg(test)]
mod tests;
