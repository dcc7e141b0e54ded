//! The pool manager actor: preloads N instances (each a model actor on its
//! own thread, owning its context), leases their sequence slots in FIFO
//! order, takes them back, probes instances and replaces broken ones. Its
//! decisions live in [`PoolState`]; this file wires them to actors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::engine::remote::RemoteSpec;
#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{Engine, InstanceInfo, InstanceOptions, InstanceSource};
use crate::error::{EngineError, PoolError};
#[cfg(feature = "fault-injection")]
use crate::pool::instance::InjectFault;
use crate::pool::instance::{self, Describe, InstanceStopped, InstanceUp, ModelActor, Probe, Retire};
use crate::pool::lease::{Lease, Release};
use crate::pool::state::{Admission, InstanceState, LeaseId, Outcome, PoolState, PoolStatus, WaiterId};

/// Settings of a pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Number of model instances (contexts) kept warm.
    pub instances: usize,
    /// Most requests waiting for an instance; more are rejected.
    pub max_queue: usize,
    /// Longest wait for an instance.
    pub acquire_timeout: Duration,
    /// Longest single generation before the watchdog cuts it off.
    pub max_generation: Duration,
    /// How often idle instances are probed.
    pub health_interval: Duration,
    /// Context settings of each instance.
    pub instance: InstanceOptions,
    /// Remote `llama-server` processes, pool members after the local
    /// instances (their ids follow the local ones).
    pub remotes: Vec<RemoteSpec>,
    /// Most slots and queue places one client (API key, else peer address)
    /// may hold at once; 0: no limit.
    pub max_per_client: usize,
}

impl PoolOptions {
    /// Local instances plus remotes.
    pub fn members(&self) -> usize {
        self.instances + self.remotes.len()
    }
}

/// Progress of the start-up load, for a progress bar or log line.
#[derive(Clone, Debug)]
pub enum LoadEvent {
    Loading {
        index: usize,
        total: usize,
    },
    Loaded {
        index: usize,
        total: usize,
        info: InstanceInfo,
        millis: u64,
    },
    /// A remote could not be reached: the pool starts without it and keeps retrying.
    Unreachable {
        index: usize,
        total: usize,
        error: String,
    },
}

pub type ProgressFn = Arc<dyn Fn(LoadEvent) + Send + Sync>;

pub struct PoolManager {
    state: PoolState,
    engine: Arc<dyn Engine>,
    opts: PoolOptions,
    /// The handle of each serving instance.
    members: Vec<Option<Addr<ModelActor>>>,
    waiters: HashMap<WaiterId, oneshot::Sender<Result<Lease, PoolError>>>,
    backoff: Vec<Duration>,
    startup: Option<oneshot::Sender<Result<(), PoolError>>>,
    progress: ProgressFn,
    load_started: std::time::Instant,
}

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl PoolManager {
    pub(crate) fn new(
        engine: Arc<dyn Engine>,
        opts: PoolOptions,
        progress: ProgressFn,
        startup: oneshot::Sender<Result<(), PoolError>>,
    ) -> Self {
        let n = opts.members();
        let mut slots = vec![opts.instance.slots.max(1) as usize; opts.instances];
        slots.extend(opts.remotes.iter().map(|r| r.slots.unwrap_or(1)));
        let mut state = PoolState::with_slots(slots, opts.max_queue).with_client_limit(opts.max_per_client);
        for (i, r) in opts.remotes.iter().enumerate() {
            state.set_endpoint(opts.instances + i, r.display_url());
        }
        Self {
            state,
            engine,
            members: (0..n).map(|_| None).collect(),
            waiters: HashMap::new(),
            backoff: vec![MIN_BACKOFF; n],
            startup: Some(startup),
            progress,
            load_started: std::time::Instant::now(),
            opts,
        }
    }

    /// Starts instance `id`'s thread, which creates its context (or
    /// connects to its remote) and then runs its model actor; it reports
    /// back with [`InstanceUp`], and with [`InstanceStopped`] when the actor
    /// is gone.
    fn spawn_instance(&mut self, id: usize, generation: u64, ctx: &mut Context<Self>) {
        if self.startup.is_some() {
            (self.progress)(LoadEvent::Loading { index: id + 1, total: self.opts.members() });
        }
        self.load_started = std::time::Instant::now();
        let engine = self.engine.clone();
        let source = match self.remote_spec(id) {
            Some(spec) => InstanceSource::Remote { engine, spec },
            None => InstanceSource::Local { engine, opts: self.opts.instance.clone() },
        };
        let pool = ctx.address();
        if let Err(e) = instance::spawn(id, generation, source, pool.clone().recipient(), pool.recipient()) {
            let result = Err(EngineError::Context(format!("could not start the instance's thread: {e}")));
            ctx.notify(InstanceUp { id, generation, result });
        }
    }

    /// The remote that member `id` is, if it is one.
    fn remote_spec(&self, id: usize) -> Option<RemoteSpec> {
        id.checked_sub(self.opts.instances).and_then(|i| self.opts.remotes.get(i)).cloned()
    }

    /// Retries a member that could not start (a remote that is down, a
    /// context that failed) after its back-off, which doubles up to a cap.
    fn retry_later(&mut self, id: usize, error: &EngineError, ctx: &mut Context<Self>) {
        let delay = self.backoff[id];
        self.backoff[id] = (delay * 2).min(MAX_BACKOFF);
        tracing::error!(instance = id, error = %error, retry_in_ms = delay.as_millis() as u64, "instance could not start; retrying");
        self.state.mark_unhealthy(id, error.to_string());
        ctx.run_later(delay, move |act, ctx| {
            if act.state.state(id) == InstanceState::Unhealthy {
                act.replace(id, ctx);
            }
        });
    }

    /// Start-up goes on with the next member, or ends.
    fn start_next(&mut self, id: usize, ctx: &mut Context<Self>) {
        if id + 1 < self.opts.members() {
            self.spawn_instance(id + 1, 0, ctx);
        } else if let Some(tx) = self.startup.take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// Takes a broken instance out and starts a fresh context on the same weights.
    fn replace(&mut self, id: usize, ctx: &mut Context<Self>) {
        let generation = self.state.begin_replace(id);
        tracing::warn!(instance = id, generation, "replacing model instance");
        if let Some(old) = self.members[id].take() {
            // It stops once its current step returns, and frees the context.
            old.do_send(Retire);
        }
        self.spawn_instance(id, generation, ctx);
    }

    /// Hands idle instances to waiters, oldest first.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        for grant in self.state.dispatch() {
            let Some(tx) = self.waiters.remove(&grant.waiter) else {
                self.state.undo_grant(&grant);
                continue;
            };
            let lease = self.lease_for(grant.instance, grant.slot, grant.lease, ctx);
            // If the waiter is gone the lease comes back and drops: released.
            let _ = tx.send(lease);
        }
    }

    /// The lease on a slot the state granted. An instance granted without a
    /// handle (which the state should never do) is given back as failed and
    /// replaced; the caller hears an error, and the pool actor goes on.
    fn lease_for(
        &mut self,
        instance: usize,
        slot: usize,
        id: LeaseId,
        ctx: &mut Context<Self>,
    ) -> Result<Lease, PoolError> {
        let Some(addr) = self.members[instance].clone() else {
            let reason = "granted a slot of an instance that has no handle".to_string();
            tracing::error!(instance, "{reason}; replacing it");
            if self.state.release(instance, slot, id, Outcome::InstanceFault { reason: reason.clone() }) {
                self.replace(instance, ctx);
            }
            return Err(PoolError::InstanceFailed { instance, reason });
        };
        Ok(Lease { instance, slot, id, addr, pool: ctx.address().recipient(), outcome: None, waited: Duration::ZERO })
    }

    fn health_tick(&mut self, ctx: &mut Context<Self>) {
        for id in self.state.begin_probes() {
            let Some(addr) = self.members[id].clone() else { continue };
            let generation = self.state.generation(id);
            // A probe that has not answered by the next probe time is stalled
            // (the actor is stuck in a step): the instance is replaced.
            let limit = self.opts.health_interval.min(self.opts.max_generation);
            let probe = addr.send(Probe).timeout(limit);
            let sent = std::time::Instant::now();
            ctx.spawn(probe.into_actor(self).map(move |res, act, ctx| {
                let res = match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("health probe failed: {e}")),
                    Err(MailboxError::Timeout) => {
                        Err(format!("health probe did not answer within {} ms", limit.as_millis()))
                    }
                    Err(_) => Err("health probe failed: the instance's thread died".to_string()),
                };
                if act.state.probe_done(id, generation, res, Some(sent.elapsed())) {
                    act.replace(id, ctx);
                } else {
                    act.dispatch(ctx);
                }
            }));
        }
    }
}

impl Actor for PoolManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(usize::MAX);
        if self.opts.members() > 0 {
            self.spawn_instance(0, 0, ctx);
        }
        if !self.opts.health_interval.is_zero() {
            ctx.run_interval(self.opts.health_interval, |act, ctx| act.health_tick(ctx));
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for m in self.members.iter_mut().filter_map(Option::take) {
            m.do_send(Retire);
        }
    }
}

impl Handler<InstanceUp> for PoolManager {
    type Result = ();

    fn handle(&mut self, msg: InstanceUp, ctx: &mut Self::Context) {
        if msg.generation != self.state.generation(msg.id) {
            // A replacement that came up too late: it goes again at once.
            if let Ok((stale, ..)) = msg.result {
                stale.do_send(Retire);
            }
            return;
        }
        let starting = self.startup.is_some();
        match msg.result {
            Ok((handle, info, streams)) => {
                if let Some(old) = self.members[msg.id].replace(handle) {
                    old.do_send(Retire);
                }
                self.backoff[msg.id] = MIN_BACKOFF;
                self.state.instance_ready(msg.id, msg.generation, streams.len());
                self.state.set_streams(msg.id, streams);
                let millis = self.load_started.elapsed().as_millis() as u64;
                if starting {
                    let total = self.opts.members();
                    (self.progress)(LoadEvent::Loaded { index: msg.id + 1, total, info, millis });
                    self.start_next(msg.id, ctx);
                } else {
                    tracing::info!(instance = msg.id, generation = msg.generation, millis, "instance replaced");
                }
                self.dispatch(ctx);
            }
            // A remote that is down (or silent) does not stop the pool: it
            // starts unhealthy and is retried with back-off.
            Err(e @ EngineError::Remote(_)) if starting => {
                let total = self.opts.members();
                (self.progress)(LoadEvent::Unreachable { index: msg.id + 1, total, error: e.to_string() });
                self.retry_later(msg.id, &e, ctx);
                self.start_next(msg.id, ctx);
            }
            Err(e) if starting => {
                if let Some(tx) = self.startup.take() {
                    let _ = tx.send(Err(PoolError::Startup(format!("instance {}: {e}", msg.id + 1))));
                }
                ctx.stop();
            }
            // Never spin: wait longer after each failed replacement.
            Err(e) => self.retry_later(msg.id, &e, ctx),
        }
    }
}

/// Asks for an instance; the affinity key (a conversation) prefers the
/// instance whose KV cache holds its prefix.
#[derive(Message)]
#[rtype(result = "AcquireReply")]
pub(crate) struct Acquire {
    pub affinity: Option<u64>,
    /// Who asks ([`PoolState::admit`]).
    pub client: Option<u64>,
}

pub(crate) enum AcquireReply {
    Granted(Lease),
    Queued(WaiterId, oneshot::Receiver<Result<Lease, PoolError>>),
    Rejected,
    ShuttingDown,
    Failed(PoolError),
}

impl Handler<Acquire> for PoolManager {
    type Result = MessageResult<Acquire>;

    fn handle(&mut self, msg: Acquire, ctx: &mut Self::Context) -> Self::Result {
        // Waiters whose caller went away (even before it got its queue place)
        // leave the queue now, so they do not count against max_queue.
        let state = &mut self.state;
        self.waiters.retain(|w, tx| {
            let gone = tx.is_closed();
            if gone {
                state.cancel_waiter(*w);
            }
            !gone
        });
        let admission = self.state.admit(msg.affinity, msg.client);
        // Queue places given to a client within its share: their owners hear why.
        for w in self.state.take_evicted() {
            if let Some(tx) = self.waiters.remove(&w) {
                let limit = self.opts.max_per_client;
                let _ = tx.send(Err(PoolError::ClientLimit { limit }));
            }
        }
        MessageResult(match admission {
            Admission::Granted { instance, slot, lease } => match self.lease_for(instance, slot, lease, ctx) {
                Ok(lease) => AcquireReply::Granted(lease),
                Err(e) => AcquireReply::Failed(e),
            },
            Admission::Queued(w) => {
                let (tx, rx) = oneshot::channel();
                self.waiters.insert(w, tx);
                AcquireReply::Queued(w, rx)
            }
            Admission::Rejected => AcquireReply::Rejected,
            Admission::ClientLimit { limit } => AcquireReply::Failed(PoolError::ClientLimit { limit }),
            Admission::ShuttingDown => AcquireReply::ShuttingDown,
        })
    }
}

/// A request starts waiting outside the pool's queue (for its
/// conversation's earlier turn) and counts against `max_queue`.
#[derive(Message)]
#[rtype(result = "Result<(), PoolError>")]
pub(crate) struct HoldOutside;

impl Handler<HoldOutside> for PoolManager {
    type Result = Result<(), PoolError>;

    fn handle(&mut self, _: HoldOutside, _: &mut Self::Context) -> Self::Result {
        if self.state.hold_outside() {
            Ok(())
        } else if self.state.status().accepting {
            Err(PoolError::QueueFull { max_queue: self.opts.max_queue })
        } else {
            Err(PoolError::ShuttingDown)
        }
    }
}

/// A request stopped waiting outside the pool's queue.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReleaseOutside;

impl Handler<ReleaseOutside> for PoolManager {
    type Result = ();

    fn handle(&mut self, _: ReleaseOutside, _: &mut Self::Context) {
        self.state.release_outside();
    }
}

/// A waiter gave up.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CancelWait(pub WaiterId);

impl Handler<CancelWait> for PoolManager {
    type Result = ();

    fn handle(&mut self, msg: CancelWait, _: &mut Self::Context) {
        self.state.cancel_waiter(msg.0);
        self.waiters.remove(&msg.0);
    }
}

impl Handler<Release> for PoolManager {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        if self.state.release(msg.instance, msg.slot, msg.lease, msg.outcome) {
            self.replace(msg.instance, ctx);
        }
        self.dispatch(ctx);
    }
}

impl Handler<InstanceStopped> for PoolManager {
    type Result = ();

    fn handle(&mut self, msg: InstanceStopped, ctx: &mut Self::Context) {
        // A current instance's actor is gone (a broken context or a panic);
        // a replaced instance's report is stale.
        if msg.generation != self.state.generation(msg.id) || self.startup.is_some() {
            return;
        }
        if matches!(self.state.state(msg.id), InstanceState::Idle | InstanceState::Busy) {
            self.state.mark_unhealthy(msg.id, "the instance stopped (its context failed or panicked)".into());
            self.replace(msg.id, ctx);
        }
    }
}

/// A snapshot of the pool.
#[derive(Message)]
#[rtype(result = "PoolStatus")]
pub(crate) struct GetStatus;

impl Handler<GetStatus> for PoolManager {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.status())
    }
}

/// Forwards a test fault to an instance.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "bool")]
pub(crate) struct InjectInto(pub usize, pub Fault);

#[cfg(feature = "fault-injection")]
impl Handler<InjectInto> for PoolManager {
    type Result = bool;

    fn handle(&mut self, msg: InjectInto, _: &mut Self::Context) -> bool {
        match self.members.get(msg.0).and_then(|m| m.as_ref()) {
            Some(addr) => {
                addr.do_send(InjectFault(msg.1));
                true
            }
            None => false,
        }
    }
}

/// Describes a live instance.
#[derive(Message)]
#[rtype(result = "Option<InstanceInfo>")]
pub(crate) struct DescribeInstance(pub usize);

impl Handler<DescribeInstance> for PoolManager {
    type Result = ResponseFuture<Option<InstanceInfo>>;

    fn handle(&mut self, msg: DescribeInstance, _: &mut Self::Context) -> Self::Result {
        let addr = self.members.get(msg.0).and_then(|m| m.clone());
        Box::pin(async move {
            match addr {
                Some(a) => a.send(Describe).await.ok(),
                None => None,
            }
        })
    }
}

/// Stops admitting new requests; queued ones get `ShuttingDown`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopAccepting;

impl Handler<StopAccepting> for PoolManager {
    type Result = ();

    fn handle(&mut self, _: StopAccepting, _: &mut Self::Context) {
        for w in self.state.stop_accepting() {
            if let Some(tx) = self.waiters.remove(&w) {
                let _ = tx.send(Err(PoolError::ShuttingDown));
            }
        }
    }
}

/// Stops the pool and every instance.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stop;

impl Handler<Stop> for PoolManager {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
