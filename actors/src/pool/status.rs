//! What the pool reports about itself: each instance's state and counters,
//! and a snapshot of the whole pool (slots, queue, health) for `/pool`, the
//! console and `/metrics`. `PoolState` (`pool/state.rs`) produces them.

use serde::Serialize;

/// Lifecycle of one instance, as shown by status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Loading,
    /// Serving, no slot leased.
    Idle,
    /// Serving, at least one slot leased.
    Busy,
    Unhealthy,
    Replacing,
}

impl InstanceState {
    pub const ALL: [InstanceState; 5] = [
        InstanceState::Loading,
        InstanceState::Idle,
        InstanceState::Busy,
        InstanceState::Unhealthy,
        InstanceState::Replacing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Loading => "loading",
            InstanceState::Idle => "idle",
            InstanceState::Busy => "busy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Replacing => "replacing",
        }
    }
}

/// Cumulative counters of one instance (across replacements).
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstanceStats {
    pub requests: u64,
    pub tokens: u64,
    /// Seconds during which at least one of its slots was leased.
    pub busy_seconds: f64,
    pub failures: u64,
    pub replacements: u64,
}

/// One instance as shown by status.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStatus {
    pub id: usize,
    /// "local" (a context in this process) or "remote" (a llama-server).
    pub kind: &'static str,
    /// A remote's URL, without credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// How long the last health probe took, in milliseconds.
    pub probe_ms: Option<f64>,
    pub state: InstanceState,
    /// Sequence slots of this instance.
    pub slots: usize,
    /// Slots leased now.
    pub slots_busy: usize,
    #[serde(flatten)]
    pub stats: InstanceStats,
    pub last_error: Option<String>,
    pub age_seconds: f64,
}

/// A snapshot of the whole pool. `total`, `available` and `in_use` count
/// sequence slots; `loading` and `unhealthy` count instances.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    /// Slots of all instances.
    pub total: usize,
    /// Free slots of instances that serve.
    pub available: usize,
    /// Leased slots.
    pub in_use: usize,
    /// Instances loading or being replaced.
    pub loading: usize,
    /// Instances marked broken, waiting for a replacement.
    pub unhealthy: usize,
    /// Requests waiting for a slot, those waiting for their conversation's
    /// earlier turn included: together at most `max_queue`.
    pub queued: usize,
    /// Of `queued`, chat turns waiting for their conversation's earlier turn.
    pub waiting_for_conversation: usize,
    pub replaced: u64,
    pub accepting: bool,
    pub instances: Vec<InstanceStatus>,
}

impl PoolStatus {
    /// True when at least one instance can serve.
    pub fn ready(&self) -> bool {
        self.accepting && self.instances.iter().any(|i| matches!(i.state, InstanceState::Idle | InstanceState::Busy))
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
        let n = self.instances.len();
        writeln!(f, "Pool Status:")?;
        writeln!(
            f,
            "   Available: {}/{} slots on {} instance{}",
            self.available,
            self.total,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        writeln!(f, "   In Use: {}", self.in_use)?;
        write!(f, "   Queued: {}   Unhealthy: {}   Replaced: {}", self.queued, self.unhealthy, self.replaced)?;
        if self.loading > 0 {
            write!(f, "   Loading: {}", self.loading)?;
        }
        Ok(())
    }
}
