//! What `/pool` and `/metrics` show of the KV tiers: the tiers by name,
//! counters by tier and the park, restore and disk-read durations.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use super::disk::DiskStatus;

/// Where a restored cache came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Another slot of the same instance held the prefix (copied).
    Slot,
    Memory,
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Slot, Tier::Memory, Tier::Disk];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Slot => "slot",
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// What `/pool` and `/metrics` show of the tiers.
#[derive(Clone, Debug, Serialize)]
pub struct KvStatus {
    /// KV bytes one token takes (all layers, K and V), measured from parked caches.
    pub bytes_per_token: u64,
    pub memory: MemoryStatus,
    pub disk: DiskStatus,
    /// Restores by tier (slot: copied from another slot; memory; disk).
    pub restores: TierCounts,
    /// Prompt tokens served from each tier.
    pub restored_tokens: TierCounts,
    /// Prompt tokens decoded (not served from any cache).
    pub decoded_tokens: u64,
    /// Caches that left a tier for lack of room (memory: to disk or gone; disk: deleted).
    pub evictions: TierCounts,
    /// Requests that found no cache of their conversation anywhere.
    pub misses: u64,
    /// Caches moved out of a slot to make room for another conversation.
    pub parks: u64,
    /// Paused sequences moved out from between sequences that decode (their
    /// KV traded streams with an edge sequence's).
    pub moves: u64,
    /// Time one park or restore took (the copy), in seconds.
    pub copy_seconds: CopyTimes,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TierCounts {
    pub slot: u64,
    pub memory: u64,
    pub disk: u64,
}

impl TierCounts {
    pub(super) fn read(a: &[AtomicU64; 3]) -> Self {
        Self { slot: a[0].load(Relaxed), memory: a[1].load(Relaxed), disk: a[2].load(Relaxed) }
    }

    pub fn get(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Slot => self.slot,
            Tier::Memory => self.memory,
            Tier::Disk => self.disk,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryStatus {
    pub entries: usize,
    pub bytes: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    /// Entries dropped because they were not used within the lifetime
    /// (`kv_disk_ttl_s`).
    pub expired: u64,
}

/// Park and restore durations: a histogram's buckets (upper bounds in
/// seconds, cumulative counts), its sum and count, by operation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyTimes {
    pub bounds: Vec<f64>,
    pub park: Histo,
    pub restore: Histo,
    /// Reading a cache file back (checksum included), before the request reaches its instance.
    pub disk_read: Histo,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Histo {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

pub(super) const COPY_BOUNDS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0];

#[derive(Default)]
pub(super) struct Histogram {
    buckets: [u64; COPY_BOUNDS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub(super) fn observe(&mut self, seconds: f64) {
        for (i, b) in COPY_BOUNDS.iter().enumerate() {
            if seconds <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub(super) fn snapshot(&self) -> Histo {
        Histo { buckets: self.buckets.to_vec(), sum: self.sum, count: self.count }
    }
}
