//! The pool's decisions, as a plain struct without actix: which instance and
//! sequence slot a request gets (its conversation's slot when free, else the
//! least loaded instance's coldest slot), who waits (FIFO, bounded), what
//! happens when a lease ends or an instance breaks. The
//! [`crate::pool::manager::PoolManager`] actor drives it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::engine::SlotStreams;

pub use super::status::{InstanceState, InstanceStats, InstanceStatus, PoolStatus};

/// Whether an instance can take requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Loading,
    Ready,
    Unhealthy,
    Replacing,
}

/// Identifies one lease (one request's use of one slot).
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

/// One sequence slot of an instance.
#[derive(Debug)]
struct SeqSlot {
    lease: Option<LeaseId>,
    /// The affinity key (conversation) of the last request served here: the
    /// slot's KV cache holds that conversation's prefix.
    affinity: Option<u64>,
    /// When it was last returned; without a match the coldest slot is given
    /// away, so that warm caches are kept longest.
    idle_since: Instant,
}

#[derive(Debug)]
struct Instance {
    health: Health,
    slots: Vec<SeqSlot>,
    /// The KV stream of each slot, when the instance moves sequences
    /// between them (a local one); else slot i is stream i.
    streams: Option<Arc<SlotStreams>>,
    /// A probe is out; none other is sent until it answers.
    probing: bool,
    busy_since: Option<Instant>,
    /// Bumped on every replacement; stale reports carry an old value.
    generation: u64,
    stats: InstanceStats,
    last_error: Option<String>,
    started_at: Instant,
    /// Where a remote instance is served; `None` for a local context.
    endpoint: Option<String>,
    /// How long the last health probe took.
    probe_ms: Option<f64>,
}

impl Instance {
    fn leased(&self) -> usize {
        self.slots.iter().filter(|s| s.lease.is_some()).count()
    }

    /// How many runs of neighbouring busy KV streams there would be with
    /// `slot` leased too. A local instance keeps one KV stream per slot, and
    /// llama.cpp decodes together only sequences whose ids follow each
    /// other: each gap (a free stream between busy ones) splits a step into
    /// one more pass over the weights. Streams, not slot numbers: the
    /// instance moves a paused sequence's stream to the edge
    /// ([`crate::engine::streams`]).
    fn runs_with(&self, slot: usize) -> usize {
        let stream = |k: usize| match &self.streams {
            Some(s) if s.len() == self.slots.len() => s.of(k),
            _ => k,
        };
        let n = self.slots.len();
        let mut busy = vec![false; n];
        for k in (0..n).filter(|&k| k == slot || self.slots[k].lease.is_some()) {
            busy[stream(k).min(n - 1)] = true;
        }
        (0..n).filter(|&s| busy[s] && (s == 0 || !busy[s - 1])).count()
    }

    fn state(&self) -> InstanceState {
        match self.health {
            Health::Loading => InstanceState::Loading,
            Health::Unhealthy => InstanceState::Unhealthy,
            Health::Replacing => InstanceState::Replacing,
            Health::Ready if self.leased() > 0 => InstanceState::Busy,
            Health::Ready => InstanceState::Idle,
        }
    }

    /// Frees every slot (the instance broke or is being replaced); its
    /// caches are gone, so are its affinities.
    fn drop_leases(&mut self) {
        if let Some(since) = self.busy_since.take() {
            self.stats.busy_seconds += since.elapsed().as_secs_f64();
        }
        for s in &mut self.slots {
            s.lease = None;
            s.affinity = None;
        }
    }
}

/// The answer to a request for a slot.
#[derive(Debug, PartialEq)]
pub enum Admission {
    Granted {
        instance: usize,
        slot: usize,
        lease: LeaseId,
    },
    Queued(WaiterId),
    Rejected,
    /// The client already holds its share of slots and queue places.
    ClientLimit {
        limit: usize,
    },
    ShuttingDown,
}

/// A waiter that may now take a slot.
#[derive(Debug, PartialEq)]
pub struct Grant {
    pub waiter: WaiterId,
    pub instance: usize,
    pub slot: usize,
    pub lease: LeaseId,
}

/// The scheduling state of a pool of `n` instances with `slots` sequences each.
#[derive(Debug)]
pub struct PoolState {
    instances: Vec<Instance>,
    /// Waiting requests in arrival order, each with its affinity key.
    waiters: VecDeque<(WaiterId, Option<u64>)>,
    max_queue: usize,
    /// Requests waiting outside this queue that count against `max_queue`
    /// too: chat turns waiting for their conversation's earlier turn.
    outside: usize,
    next_id: u64,
    replaced: u64,
    accepting: bool,
    /// Most slots and queue places one client may hold at once (0: no limit).
    max_per_client: usize,
    /// Slots and queue places each client holds, and whose each lease and
    /// queue place is.
    per_client: HashMap<u64, usize>,
    lease_client: HashMap<LeaseId, u64>,
    waiter_client: HashMap<WaiterId, u64>,
    /// Queue places taken back from a client over its share, to be told so.
    evicted: Vec<WaiterId>,
}

impl PoolState {
    /// All instances start `Loading`.
    pub fn new(instances: usize, slots: usize, max_queue: usize) -> Self {
        Self::with_slots(vec![slots; instances], max_queue)
    }

    /// Instances with the given numbers of slots, all `Loading`.
    pub fn with_slots(slots: Vec<usize>, max_queue: usize) -> Self {
        let now = Instant::now();
        let instances = slots
            .into_iter()
            .map(|n| Instance {
                health: Health::Loading,
                slots: (0..n.max(1)).map(|_| SeqSlot { lease: None, affinity: None, idle_since: now }).collect(),
                streams: None,
                probing: false,
                busy_since: None,
                generation: 0,
                stats: InstanceStats::default(),
                last_error: None,
                started_at: now,
                endpoint: None,
                probe_ms: None,
            })
            .collect();
        Self {
            instances,
            waiters: VecDeque::new(),
            max_queue,
            outside: 0,
            next_id: 1,
            replaced: 0,
            accepting: true,
            max_per_client: 0,
            per_client: HashMap::new(),
            lease_client: HashMap::new(),
            waiter_client: HashMap::new(),
            evicted: Vec::new(),
        }
    }

    /// One client may hold at most `limit` slots and queue places at once (0: no limit).
    pub fn with_client_limit(mut self, limit: usize) -> Self {
        self.max_per_client = limit;
        self
    }

    /// Slots and queue places `client` holds now.
    pub fn held_by(&self, client: u64) -> usize {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    fn claim(&mut self, client: Option<u64>) {
        if let Some(c) = client {
            *self.per_client.entry(c).or_insert(0) += 1;
        }
    }

    fn unclaim(&mut self, client: Option<u64>) {
        if let Some(c) = client {
            if let Some(n) = self.per_client.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.per_client.remove(&c);
                }
            }
        }
    }

    /// The leases of `instance` end without a release (it broke, is
    /// replaced or resized): their clients hold them no more.
    fn forget_leases(&mut self, instance: usize) {
        let leases: Vec<LeaseId> = self.instances[instance].slots.iter().filter_map(|s| s.lease).collect();
        for lease in leases {
            let client = self.lease_client.remove(&lease);
            self.unclaim(client);
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn size(&self) -> usize {
        self.instances.len()
    }

    pub fn state(&self, instance: usize) -> InstanceState {
        self.instances[instance].state()
    }

    pub fn generation(&self, instance: usize) -> u64 {
        self.instances[instance].generation
    }

    /// The lease a slot is serving, if any.
    pub fn current_lease(&self, instance: usize, slot: usize) -> Option<LeaseId> {
        self.instances[instance].slots[slot].lease
    }

    /// A request asks for a slot: a free one if nobody waits before it, else
    /// a place in the queue, else rejection. `affinity` names what the
    /// request continues (a conversation): see [`Self::pick`].
    ///
    /// `client` names who asks (an API key, a peer address): one client
    /// holds at most its share of slots and queue places
    /// ([`Self::with_client_limit`]) while another client waits: past it,
    /// [`Admission::ClientLimit`]. Alone, a client may use every slot and
    /// queue place (nothing is left idle), but a full queue then gives the
    /// newest place of the client furthest over its share to a client within
    /// it ([`Self::take_evicted`]), and freed slots go to the waiting client
    /// that holds the fewest ([`Self::dispatch`]).
    pub fn admit(&mut self, affinity: Option<u64>, client: Option<u64>) -> Admission {
        if !self.accepting {
            return Admission::ShuttingDown;
        }
        if let Some(c) = client.filter(|_| self.max_per_client > 0) {
            let others_wait = self.waiters.iter().any(|(w, _)| self.waiter_client.get(w) != Some(&c));
            if others_wait && self.held_by(c) >= self.max_per_client {
                return Admission::ClientLimit { limit: self.max_per_client };
            }
        }
        if self.waiters.is_empty() {
            if let Some((instance, slot)) = self.pick(affinity) {
                let lease = LeaseId(self.fresh_id());
                self.lease(instance, slot, lease, affinity);
                if let Some(c) = client {
                    self.lease_client.insert(lease, c);
                }
                self.claim(client);
                return Admission::Granted { instance, slot, lease };
            }
        }
        if self.queued() >= self.max_queue && !self.evict_for(client) {
            return Admission::Rejected;
        }
        let waiter = WaiterId(self.fresh_id());
        self.waiters.push_back((waiter, affinity));
        if let Some(c) = client {
            self.waiter_client.insert(waiter, c);
        }
        self.claim(client);
        Admission::Queued(waiter)
    }

    /// The free slot for a request: the one that last served the same
    /// affinity key (its KV cache holds that conversation's prefix); else, on
    /// the instance with the fewest leased slots (spreading load over
    /// contexts), a slot next to the busy ones (no gap: see
    /// [`Instance::runs_with`]) and of those the one idle longest (the
    /// coldest cache; a cache given away is parked, not lost). Affinity
    /// never makes a request wait: any free slot is better than a queue.
    fn pick(&self, affinity: Option<u64>) -> Option<(usize, usize)> {
        let free = || {
            self.instances.iter().enumerate().filter(|(_, inst)| inst.health == Health::Ready).flat_map(|(i, inst)| {
                inst.slots.iter().enumerate().filter(|(_, s)| s.lease.is_none()).map(move |(j, s)| (i, j, s))
            })
        };
        if let Some(key) = affinity {
            if let Some((i, j, _)) = free().find(|(_, _, s)| s.affinity == Some(key)) {
                return Some((i, j));
            }
        }
        free()
            .min_by_key(|&(i, j, s)| (self.instances[i].leased(), self.instances[i].runs_with(j), s.idle_since))
            .map(|(i, j, _)| (i, j))
    }

    fn lease(&mut self, instance: usize, slot: usize, lease: LeaseId, affinity: Option<u64>) {
        let inst = &mut self.instances[instance];
        if inst.busy_since.is_none() {
            inst.busy_since = Some(Instant::now());
        }
        inst.stats.requests += 1;
        let s = &mut inst.slots[slot];
        s.lease = Some(lease);
        // A request without a key leaves nothing to find again.
        s.affinity = affinity;
    }

    /// The queue is full and `client` asks: the newest queue place of the
    /// client furthest over its share (not `client`) is taken back
    /// ([`Self::take_evicted`]), when `client` itself is within its share.
    fn evict_for(&mut self, client: Option<u64>) -> bool {
        let (Some(c), share) = (client, self.max_per_client) else { return false };
        if share == 0 || self.held_by(c) >= share {
            return false;
        }
        let over = self
            .per_client
            .iter()
            .filter(|&(&other, &n)| other != c && n > share && self.waiter_client.values().any(|w| *w == other))
            .max_by_key(|&(_, &n)| n)
            .map(|(&other, _)| other);
        let Some(over) = over else { return false };
        let Some(at) = self.waiters.iter().rposition(|(w, _)| self.waiter_client.get(w) == Some(&over)) else {
            return false;
        };
        let (waiter, _) = self.waiters.remove(at).expect("a waiter at that place");
        let client = self.waiter_client.remove(&waiter);
        self.unclaim(client);
        self.evicted.push(waiter);
        true
    }

    /// Waiters whose queue place was given to a client within its share:
    /// answer each with the client limit.
    pub fn take_evicted(&mut self) -> Vec<WaiterId> {
        std::mem::take(&mut self.evicted)
    }

    /// Requests waiting: in this queue and outside it.
    pub fn queued(&self) -> usize {
        self.waiters.len() + self.outside
    }

    /// A request starts waiting outside the queue (for its conversation's
    /// earlier turn); false, and nothing counted, when the queue is full or
    /// the pool stopped admitting.
    pub fn hold_outside(&mut self) -> bool {
        if !self.accepting || self.queued() >= self.max_queue {
            return false;
        }
        self.outside += 1;
        true
    }

    /// A request stopped waiting outside the queue.
    pub fn release_outside(&mut self) {
        self.outside = self.outside.saturating_sub(1);
    }

    /// A waiter gave up (timeout, client gone). Returns whether it was queued.
    pub fn cancel_waiter(&mut self, waiter: WaiterId) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|(w, _)| *w != waiter);
        let removed = self.waiters.len() != before;
        if removed {
            let client = self.waiter_client.remove(&waiter);
            self.unclaim(client);
        }
        removed
    }

    /// Pairs free slots with waiters: the oldest waiter of the client that
    /// holds the fewest slots and queue places first (one client's flood
    /// does not starve the others; alone it is plain FIFO). Each gets the
    /// free slot that matches its affinity, if one does.
    pub fn dispatch(&mut self) -> Vec<Grant> {
        let mut grants = Vec::new();
        loop {
            let held = |w: &WaiterId| self.waiter_client.get(w).map_or(0, |c| self.held_by(*c));
            let Some(at) = self.waiters.iter().enumerate().min_by_key(|(i, (w, _))| (held(w), *i)).map(|(i, _)| i)
            else {
                break;
            };
            let (waiter, affinity) = self.waiters[at];
            let Some((instance, slot)) = self.pick(affinity) else { break };
            self.waiters.remove(at);
            let lease = LeaseId(self.fresh_id());
            self.lease(instance, slot, lease, affinity);
            // The client's queue place becomes its slot: its count stays.
            if let Some(c) = self.waiter_client.remove(&waiter) {
                self.lease_client.insert(lease, c);
            }
            grants.push(Grant { waiter, instance, slot, lease });
        }
        grants
    }

    /// A grant could not be delivered (the waiter is gone): undo it.
    pub fn undo_grant(&mut self, grant: &Grant) {
        if self.instances[grant.instance].slots[grant.slot].lease == Some(grant.lease) {
            let client = self.lease_client.remove(&grant.lease);
            self.unclaim(client);
        }
        let inst = &mut self.instances[grant.instance];
        if inst.slots[grant.slot].lease == Some(grant.lease) {
            inst.slots[grant.slot].lease = None;
            inst.stats.requests -= 1;
            if inst.leased() == 0 {
                inst.busy_since = None;
            }
        }
    }

    /// A lease ends. Returns true when the instance must be replaced. A lease
    /// that is not current (already released or replaced) is ignored.
    pub fn release(&mut self, instance: usize, slot: usize, lease: LeaseId, outcome: Outcome) -> bool {
        let Some(inst) = self.instances.get_mut(instance) else { return false };
        if inst.slots.get(slot).and_then(|s| s.lease) != Some(lease) {
            return false;
        }
        let client = self.lease_client.remove(&lease);
        self.unclaim(client);
        let inst = &mut self.instances[instance];
        match outcome {
            Outcome::Ok { tokens } => {
                inst.stats.tokens += tokens;
                let s = &mut inst.slots[slot];
                s.lease = None;
                s.idle_since = Instant::now();
                if inst.leased() == 0 {
                    if let Some(since) = inst.busy_since.take() {
                        inst.stats.busy_seconds += since.elapsed().as_secs_f64();
                    }
                }
                false
            }
            Outcome::InstanceFault { reason } => {
                self.mark_unhealthy(instance, reason);
                true
            }
        }
    }

    /// Marks an instance broken (failed lease or probe, dead loop); every
    /// slot's lease ends with it. Returns false when it already was.
    pub fn mark_unhealthy(&mut self, instance: usize, reason: String) -> bool {
        if self.instances[instance].health == Health::Unhealthy {
            return false;
        }
        self.forget_leases(instance);
        let inst = &mut self.instances[instance];
        inst.stats.failures += 1;
        inst.last_error = Some(reason);
        inst.health = Health::Unhealthy;
        inst.probing = false;
        inst.drop_leases();
        true
    }

    /// Starts replacing an instance; returns the new generation.
    pub fn begin_replace(&mut self, instance: usize) -> u64 {
        self.forget_leases(instance);
        let inst = &mut self.instances[instance];
        inst.health = Health::Replacing;
        inst.probing = false;
        inst.drop_leases();
        inst.generation += 1;
        inst.generation
    }

    /// Names where a remote instance is served (shown in status).
    pub fn set_endpoint(&mut self, instance: usize, endpoint: String) {
        self.instances[instance].endpoint = Some(endpoint);
    }

    /// An instance (first load or replacement) is up with `slots` sequence
    /// slots (a remote says how many it has): they are all free. Returns
    /// false for a stale report.
    pub fn instance_ready(&mut self, instance: usize, generation: u64, slots: usize) -> bool {
        if self.instances[instance].generation != generation {
            return false;
        }
        if slots > 0 && slots != self.instances[instance].slots.len() {
            self.forget_leases(instance);
        }
        let inst = &mut self.instances[instance];
        if slots > 0 && slots != inst.slots.len() {
            let now = Instant::now();
            inst.drop_leases();
            inst.slots = (0..slots).map(|_| SeqSlot { lease: None, affinity: None, idle_since: now }).collect();
        }
        if inst.health == Health::Replacing {
            inst.stats.replacements += 1;
            self.replaced += 1;
        }
        inst.health = Health::Ready;
        inst.started_at = Instant::now();
        true
    }

    /// Where the slots of `instance`'s (new) context keep their sequences.
    pub fn set_streams(&mut self, instance: usize, streams: Arc<SlotStreams>) {
        self.instances[instance].streams = Some(streams);
    }

    /// Serving instances to probe now (busy ones too: the probe runs between
    /// two steps of the loop, on a sequence of its own). Each has one probe
    /// out until [`Self::probe_done`].
    pub fn begin_probes(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, inst) in self.instances.iter_mut().enumerate() {
            if inst.health == Health::Ready && !inst.probing {
                inst.probing = true;
                out.push(i);
            }
        }
        out
    }

    /// A probe ended. Returns true when the instance must be replaced.
    /// `took`: how long the probe took (shown in status).
    pub fn probe_done(
        &mut self,
        instance: usize,
        generation: u64,
        result: Result<(), String>,
        took: Option<std::time::Duration>,
    ) -> bool {
        let inst = &mut self.instances[instance];
        if inst.generation != generation || !inst.probing {
            return false;
        }
        inst.probing = false;
        if let Some(t) = took {
            inst.probe_ms = Some(t.as_secs_f64() * 1e3);
        }
        match result {
            Ok(()) => false,
            Err(reason) => self.mark_unhealthy(instance, reason),
        }
    }

    /// Stops admitting; returns the waiters to turn away.
    pub fn stop_accepting(&mut self) -> Vec<WaiterId> {
        self.accepting = false;
        for (w, _) in &self.waiters {
            if let Some(c) = self.waiter_client.remove(w) {
                if let Some(n) = self.per_client.get_mut(&c) {
                    *n -= 1;
                }
            }
        }
        self.per_client.retain(|_, n| *n > 0);
        self.waiters.drain(..).map(|(w, _)| w).collect()
    }

    pub fn status(&self) -> PoolStatus {
        let serving = |i: &&Instance| i.health == Health::Ready;
        let count = |h: &dyn Fn(Health) -> bool| self.instances.iter().filter(|i| h(i.health)).count();
        PoolStatus {
            total: self.instances.iter().map(|i| i.slots.len()).sum(),
            available: self.instances.iter().filter(serving).map(|i| i.slots.len() - i.leased()).sum(),
            in_use: self.instances.iter().map(Instance::leased).sum(),
            loading: count(&|h| matches!(h, Health::Loading | Health::Replacing)),
            unhealthy: count(&|h| h == Health::Unhealthy),
            queued: self.queued(),
            waiting_for_conversation: self.outside,
            replaced: self.replaced,
            accepting: self.accepting,
            instances: self
                .instances
                .iter()
                .enumerate()
                .map(|(id, inst)| InstanceStatus {
                    id,
                    kind: if inst.endpoint.is_some() { "remote" } else { "local" },
                    endpoint: inst.endpoint.clone(),
                    probe_ms: inst.probe_ms,
                    state: inst.state(),
                    slots: inst.slots.len(),
                    slots_busy: inst.leased(),
                    stats: InstanceStats {
                        busy_seconds: inst.stats.busy_seconds
                            + inst.busy_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
                        ..inst.stats.clone()
                    },
                    last_error: inst.last_error.clone(),
                    age_seconds: inst.started_at.elapsed().as_secs_f64(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
