//! The pool's decisions, as a plain struct without actix: which instance a
//! request gets, who waits (FIFO, bounded), what happens when a lease ends.
//! The [`crate::pool::manager::PoolManager`] actor drives it.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

use crate::engine::kv_cache::CACHED_SEQUENCES;

/// Lifecycle of one instance slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Loading,
    Idle,
    Busy,
    /// Idle, running a health probe (not leased out meanwhile).
    Probing,
    Unhealthy,
    Replacing,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Loading,
        InstanceState::Idle,
        InstanceState::Busy,
        InstanceState::Probing,
        InstanceState::Unhealthy,
        InstanceState::Replacing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Loading => "loading",
            InstanceState::Idle => "idle",
            InstanceState::Busy => "busy",
            InstanceState::Probing => "probing",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Replacing => "replacing",
        }
    }
}

/// Identifies one lease (one request's use of one instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct LeaseId(pub u64);

/// Identifies one waiting request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WaiterId(pub u64);

/// How a lease ended, reported when it is returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The request finished (or was cancelled) and the instance is fine.
    Ok { tokens: u64 },
    /// The instance is broken (decode error, crash, stuck): replace it.
    InstanceFault { reason: String },
}

/// Cumulative counters of one instance slot (across replacements).
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstanceStats {
    pub requests: u64,
    pub tokens: u64,
    pub busy_seconds: f64,
    pub failures: u64,
    pub replacements: u64,
}

#[derive(Debug)]
struct Slot {
    state: InstanceState,
    lease: Option<LeaseId>,
    busy_since: Option<Instant>,
    /// Bumped on every replacement; stale reports carry an old value.
    generation: u64,
    stats: InstanceStats,
    last_error: Option<String>,
    started_at: Instant,
    /// Affinity keys of the last requests served, newest first: the instance's
    /// KV cache holds their conversations' prefixes (as many as it keeps
    /// sequences). Empty after a replacement.
    affinities: VecDeque<u64>,
    /// When the instance last became idle; the least recently used goes first
    /// to a request without a match, so that warm caches are kept longest.
    idle_since: Instant,
}

/// The answer to a request for an instance.
#[derive(Debug, PartialEq)]
pub enum Admission {
    Granted { instance: usize, lease: LeaseId },
    Queued(WaiterId),
    Rejected,
    ShuttingDown,
}

/// A waiter that may now take an instance.
#[derive(Debug, PartialEq)]
pub struct Grant {
    pub waiter: WaiterId,
    pub instance: usize,
    pub lease: LeaseId,
}

/// One instance as shown by status.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStatus {
    pub id: usize,
    pub state: InstanceState,
    #[serde(flatten)]
    pub stats: InstanceStats,
    pub last_error: Option<String>,
    pub age_seconds: f64,
}

/// A snapshot of the whole pool.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    pub total: usize,
    pub available: usize,
    pub in_use: usize,
    pub loading: usize,
    pub unhealthy: usize,
    pub queued: usize,
    pub replaced: u64,
    pub accepting: bool,
    pub instances: Vec<InstanceStatus>,
}

impl PoolStatus {
    /// True when at least one instance can serve.
    pub fn ready(&self) -> bool {
        self.accepting && self.available + self.in_use > 0 && self.loading < self.total
    }

    /// Totals over all instances.
    pub fn totals(&self) -> InstanceStats {
        let mut t = InstanceStats::default();
        for i in &self.instances {
            t.requests += i.stats.requests;
            t.tokens += i.stats.tokens;
            t.busy_seconds += i.stats.busy_seconds;
            t.failures += i.stats.failures;
            t.replacements += i.stats.replacements;
        }
        t
    }
}

impl std::fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Pool Status:")?;
        writeln!(f, "   Available: {}/{}", self.available, self.total)?;
        writeln!(f, "   In Use: {}", self.in_use)?;
        write!(f, "   Queued: {}   Unhealthy: {}   Replaced: {}", self.queued, self.unhealthy, self.replaced)?;
        if self.loading > 0 {
            write!(f, "   Loading: {}", self.loading)?;
        }
        Ok(())
    }
}

/// The scheduling state of a pool of `n` instances.
#[derive(Debug)]
pub struct PoolState {
    slots: Vec<Slot>,
    /// Waiting requests in arrival order, each with its affinity key.
    waiters: VecDeque<(WaiterId, Option<u64>)>,
    max_queue: usize,
    next_id: u64,
    replaced: u64,
    accepting: bool,
}

impl PoolState {
    /// All slots start `Loading`.
    pub fn new(instances: usize, max_queue: usize) -> Self {
        let now = Instant::now();
        let slots = (0..instances)
            .map(|_| Slot {
                state: InstanceState::Loading,
                lease: None,
                busy_since: None,
                generation: 0,
                stats: InstanceStats::default(),
                last_error: None,
                started_at: now,
                affinities: VecDeque::new(),
                idle_since: now,
            })
            .collect();
        Self { slots, waiters: VecDeque::new(), max_queue, next_id: 1, replaced: 0, accepting: true }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn size(&self) -> usize {
        self.slots.len()
    }

    pub fn state(&self, instance: usize) -> InstanceState {
        self.slots[instance].state
    }

    pub fn generation(&self, instance: usize) -> u64 {
        self.slots[instance].generation
    }

    /// The lease an instance is serving, if any.
    pub fn current_lease(&self, instance: usize) -> Option<LeaseId> {
        self.slots[instance].lease
    }

    /// A request asks for an instance: an idle one if nobody waits before it,
    /// else a place in the queue, else rejection. `affinity` names what the
    /// request continues (a conversation): see [`Self::pick_idle`].
    pub fn admit(&mut self, affinity: Option<u64>) -> Admission {
        if !self.accepting {
            return Admission::ShuttingDown;
        }
        if self.waiters.is_empty() {
            if let Some(instance) = self.pick_idle(affinity) {
                let lease = LeaseId(self.fresh_id());
                self.lease(instance, lease, affinity);
                return Admission::Granted { instance, lease };
            }
        }
        if self.waiters.len() >= self.max_queue {
            return Admission::Rejected;
        }
        let waiter = WaiterId(self.fresh_id());
        self.waiters.push_back((waiter, affinity));
        Admission::Queued(waiter)
    }

    /// The idle instance for a request: the one whose cache holds the same
    /// affinity key (its conversation's prefix), else the least recently used
    /// (a cold or long-idle cache). Affinity never makes a request wait: any
    /// idle instance is better than a queue.
    fn pick_idle(&self, affinity: Option<u64>) -> Option<usize> {
        let idle = || self.slots.iter().enumerate().filter(|(_, s)| s.state == InstanceState::Idle);
        if let Some(key) = affinity {
            if let Some((i, _)) = idle().find(|(_, s)| s.affinities.contains(&key)) {
                return Some(i);
            }
        }
        idle().min_by_key(|(_, s)| s.idle_since).map(|(i, _)| i)
    }

    fn lease(&mut self, instance: usize, lease: LeaseId, affinity: Option<u64>) {
        let slot = &mut self.slots[instance];
        slot.state = InstanceState::Busy;
        slot.lease = Some(lease);
        slot.busy_since = Some(Instant::now());
        slot.stats.requests += 1;
        if let Some(key) = affinity {
            slot.affinities.retain(|k| *k != key);
            slot.affinities.push_front(key);
            slot.affinities.truncate(CACHED_SEQUENCES);
        }
    }

    /// A waiter gave up (timeout, client gone). Returns whether it was queued.
    pub fn cancel_waiter(&mut self, waiter: WaiterId) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|(w, _)| *w != waiter);
        self.waiters.len() != before
    }

    /// Pairs idle instances with waiters, oldest waiter first (each gets the
    /// idle instance that matches its affinity, if one does).
    pub fn dispatch(&mut self) -> Vec<Grant> {
        let mut grants = Vec::new();
        while let Some(&(waiter, affinity)) = self.waiters.front() {
            let Some(instance) = self.pick_idle(affinity) else { break };
            self.waiters.pop_front();
            let lease = LeaseId(self.fresh_id());
            self.lease(instance, lease, affinity);
            grants.push(Grant { waiter, instance, lease });
        }
        grants
    }

    /// A grant could not be delivered (the waiter is gone): undo it.
    pub fn undo_grant(&mut self, grant: &Grant) {
        let slot = &mut self.slots[grant.instance];
        if slot.lease == Some(grant.lease) {
            slot.state = InstanceState::Idle;
            slot.lease = None;
            slot.busy_since = None;
            slot.stats.requests -= 1;
        }
    }

    /// A lease ends. Returns true when the instance must be replaced. A lease
    /// that is not current (already released or replaced) is ignored.
    pub fn release(&mut self, instance: usize, lease: LeaseId, outcome: Outcome) -> bool {
        let Some(slot) = self.slots.get_mut(instance) else { return false };
        if slot.lease != Some(lease) {
            return false;
        }
        slot.lease = None;
        if let Some(since) = slot.busy_since.take() {
            slot.stats.busy_seconds += since.elapsed().as_secs_f64();
        }
        match outcome {
            Outcome::Ok { tokens } => {
                slot.stats.tokens += tokens;
                slot.state = InstanceState::Idle;
                slot.idle_since = Instant::now();
                false
            }
            Outcome::InstanceFault { reason } => {
                slot.stats.failures += 1;
                slot.last_error = Some(reason);
                slot.state = InstanceState::Unhealthy;
                true
            }
        }
    }

    /// Marks an instance broken outside a lease (failed probe, dead actor).
    pub fn mark_unhealthy(&mut self, instance: usize, reason: String) {
        let slot = &mut self.slots[instance];
        slot.stats.failures += 1;
        slot.last_error = Some(reason);
        slot.state = InstanceState::Unhealthy;
        slot.lease = None;
        slot.busy_since = None;
    }

    /// Starts replacing an instance; returns the new generation.
    pub fn begin_replace(&mut self, instance: usize) -> u64 {
        let slot = &mut self.slots[instance];
        slot.state = InstanceState::Replacing;
        slot.lease = None;
        slot.busy_since = None;
        slot.affinities.clear();
        slot.generation += 1;
        slot.generation
    }

    /// An instance (first load or replacement) is up: it becomes idle.
    /// Returns false for a stale report.
    pub fn instance_ready(&mut self, instance: usize, generation: u64) -> bool {
        let slot = &mut self.slots[instance];
        if slot.generation != generation {
            return false;
        }
        if slot.state == InstanceState::Replacing {
            slot.stats.replacements += 1;
            self.replaced += 1;
        }
        slot.state = InstanceState::Idle;
        slot.started_at = Instant::now();
        true
    }

    /// Idle instances to probe now; they are `Probing` until [`Self::probe_done`].
    pub fn begin_probes(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.state == InstanceState::Idle {
                s.state = InstanceState::Probing;
                out.push(i);
            }
        }
        out
    }

    /// A probe ended; a healthy instance is idle again. Returns true when it
    /// must be replaced.
    pub fn probe_done(&mut self, instance: usize, generation: u64, result: Result<(), String>) -> bool {
        if self.slots[instance].generation != generation || self.slots[instance].state != InstanceState::Probing {
            return false;
        }
        match result {
            Ok(()) => {
                self.slots[instance].state = InstanceState::Idle;
                false
            }
            Err(reason) => {
                self.mark_unhealthy(instance, reason);
                true
            }
        }
    }

    /// Stops admitting; returns the waiters to turn away.
    pub fn stop_accepting(&mut self) -> Vec<WaiterId> {
        self.accepting = false;
        self.waiters.drain(..).map(|(w, _)| w).collect()
    }

    pub fn status(&self) -> PoolStatus {
        let count = |f: &dyn Fn(InstanceState) -> bool| self.slots.iter().filter(|s| f(s.state)).count();
        PoolStatus {
            total: self.slots.len(),
            available: count(&|s| matches!(s, InstanceState::Idle | InstanceState::Probing)),
            in_use: count(&|s| s == InstanceState::Busy),
            loading: count(&|s| matches!(s, InstanceState::Loading | InstanceState::Replacing)),
            unhealthy: count(&|s| s == InstanceState::Unhealthy),
            queued: self.waiters.len(),
            replaced: self.replaced,
            accepting: self.accepting,
            instances: self
                .slots
                .iter()
                .enumerate()
                .map(|(id, s)| InstanceStatus {
                    id,
                    state: s.state,
                    stats: InstanceStats {
                        busy_seconds: s.stats.busy_seconds
                            + s.busy_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
                        ..s.stats.clone()
                    },
                    last_error: s.last_error.clone(),
                    age_seconds: s.started_at.elapsed().as_secs_f64(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
