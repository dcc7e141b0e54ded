//! Where a conversation's KV cache waits while it is not in a slot: a
//! host-memory tier with a byte budget for the whole process (shared by every
//! local instance, least recently used out first), and below it a disk tier
//! under the data directory that survives restarts. Entries are kept by
//! [`CacheKey`] (a namespace and a conversation), one per conversation: a
//! request can only ever be given the cache of its own conversation, and the
//! batcher still keeps only the part whose tokens the new prompt starts with.
//!
//! A stateless client's caches (keyed by its `X-Conversation-Id`,
//! `prompt_cache_key` or `user`) have no delete of their own but a lifetime
//! ([`KvTierOptions::ttl`]: a cache unused that long is dropped from memory
//! and disk) and [`KvTiers::forget_key`], which `DELETE /conversations/{id}`
//! calls with the key that id gives in the caller's namespace.

mod disk;
mod key;
mod status;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::token::LlamaToken;

pub use disk::{DiskStatus, Fingerprint};
use key::MAX_DELETED;
pub use key::{fnv1a, CacheKey};
pub use status::{CopyTimes, Histo, KvStatus, MemoryStatus, Tier, TierCounts};
use status::{Histogram, COPY_BOUNDS};

/// The tiers' settings.
#[derive(Clone, Debug)]
pub struct KvTierOptions {
    /// Host memory all parked caches may take, in bytes (0: no memory tier).
    pub ram_bytes: u64,
    /// Disk the cache files may take, in bytes (0: no disk tier).
    pub disk_bytes: u64,
    /// The disk tier's directory (`<data_dir>/kv`); none: no disk tier.
    pub dir: Option<PathBuf>,
    /// A cache neither parked, written nor read for this long is dropped,
    /// in memory and on disk (`kv_disk_ttl_s`); none: caches live until their
    /// tier's budget evicts them.
    pub ttl: Option<Duration>,
}

impl KvTierOptions {
    /// Memory only, with `ram_bytes` (library users and tests that set nothing).
    pub fn memory(ram_bytes: u64) -> Self {
        Self { ram_bytes, disk_bytes: 0, dir: None, ttl: None }
    }
}

/// The default memory budget: an eighth of the machine's memory (or of the
/// cgroup's limit, where lower), at most 8 GiB (llama-server's `--cache-ram`
/// default), at least 256 MiB.
pub fn default_ram_bytes() -> u64 {
    let total = physical_memory().unwrap_or(8 << 30);
    (total / 8).clamp(256 << 20, 8 << 30)
}

fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(kb * 1024, |l| l.min(kb * 1024)))
}

/// A parked cache: the tokens its KV state holds and the state itself
/// (llama.cpp's sequence state format).
pub struct Parked {
    pub tokens: Vec<LlamaToken>,
    pub state: Vec<u8>,
    /// Where it was found.
    pub tier: Tier,
}

struct MemEntry {
    tokens: Vec<LlamaToken>,
    state: Vec<u8>,
    last_used: u64,
    /// When it was parked or read from disk (for the lifetime).
    used_at: Instant,
    /// Read back from disk (a restore from it counts as a disk restore).
    from_disk: bool,
}

#[derive(Default)]
struct MemTier {
    entries: HashMap<CacheKey, MemEntry>,
    bytes: u64,
    clock: u64,
    /// Conversations deleted while their caches may still sit in a slot.
    deleted: HashSet<u64>,
    /// Keys forgotten ([`KvTiers::forget_key`]) while a slot may still hold
    /// their cache: not parked again until a request of the key starts.
    forgotten: HashSet<CacheKey>,
    /// Keys a slot took ([`KvTiers::tokens_of`]) and has not parked since:
    /// their cache is in a slot, as far as the tiers can tell.
    in_slots: HashSet<CacheKey>,
    /// The last sweep for expired entries.
    swept_at: Option<Instant>,
}

/// Counters by tier.
#[derive(Default)]
struct Counters {
    restores: [AtomicU64; 3],
    restored_tokens: [AtomicU64; 3],
    evictions: [AtomicU64; 3],
    misses: AtomicU64,
    decoded_tokens: AtomicU64,
    parks: AtomicU64,
    moves: AtomicU64,
    /// Memory entries dropped unused past the lifetime.
    expired: AtomicU64,
}

/// The process's KV tiers, shared by every local instance.
pub struct KvTiers {
    ram_budget: u64,
    /// The lifetime of an unused cache, and how often memory is swept for it.
    ttl: Option<(Duration, Duration)>,
    mem: Mutex<MemTier>,
    disk: Option<disk::DiskTier>,
    counters: Counters,
    /// Park, restore and disk-read durations.
    times: Mutex<(Histogram, Histogram, Histogram)>,
    bytes_per_token: AtomicU64,
    /// Instances whose step loops run: shutdown waits for them to park their slots.
    live: Mutex<usize>,
    live_changed: Condvar,
}

impl std::fmt::Debug for KvTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTiers").field("ram_budget", &self.ram_budget).field("disk", &self.disk.is_some()).finish()
    }
}

impl KvTiers {
    /// Opens the tiers: the disk tier's directory is created and scanned
    /// (files of another model or format, and unfinished writes, are removed
    /// unless another process uses the directory too; files unused past the
    /// lifetime are removed in any case).
    pub fn open(opts: &KvTierOptions, fingerprint: Fingerprint) -> Arc<Self> {
        let disk = match &opts.dir {
            Some(dir) if opts.disk_bytes > 0 => {
                Some(disk::DiskTier::open(dir.clone(), opts.disk_bytes, opts.ttl, fingerprint))
            }
            _ => None,
        };
        Arc::new(Self {
            ram_budget: opts.ram_bytes,
            ttl: opts.ttl.map(|ttl| (ttl, disk::sweep_interval(ttl))),
            mem: Mutex::new(MemTier::default()),
            disk,
            counters: Counters::default(),
            times: Mutex::new((Histogram::default(), Histogram::default(), Histogram::default())),
            bytes_per_token: AtomicU64::new(0),
            live: Mutex::new(0),
            live_changed: Condvar::new(),
        })
    }

    /// Memory only.
    pub fn memory_only(ram_bytes: u64) -> Arc<Self> {
        Self::open(&KvTierOptions::memory(ram_bytes), Fingerprint::default())
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, MemTier> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ram_budget(&self) -> u64 {
        self.ram_budget
    }

    /// Notes the KV bytes per token seen in a state (for status and budgets).
    pub fn note_bytes_per_token(&self, bytes: u64) {
        if bytes > 0 {
            self.bytes_per_token.store(bytes, Relaxed);
        }
    }

    /// A paused sequence's KV traded streams with another's (see
    /// [`crate::engine::streams`]).
    pub fn record_move(&self) {
        self.counters.moves.fetch_add(1, Relaxed);
    }

    /// Keeps `key`'s cache in memory (replacing an older one of the same
    /// key); what no longer fits goes to disk, least recently used first.
    pub fn park(&self, key: CacheKey, tokens: Vec<LlamaToken>, state: Vec<u8>, took: Duration) {
        if tokens.is_empty() {
            return;
        }
        self.counters.parks.fetch_add(1, Relaxed);
        self.times.lock().unwrap_or_else(|e| e.into_inner()).0.observe(took.as_secs_f64());
        let size = state.len() as u64;
        let mut mem = self.mem();
        mem.in_slots.remove(&key);
        self.expire_memory(&mut mem, false);
        if mem.deleted.contains(&key.conversation) || mem.forgotten.contains(&key) {
            return;
        }
        if size > self.ram_budget {
            // Too big for memory (or no memory tier): straight to disk. An
            // older entry of the key leaves memory: evicted later it would
            // overwrite the newer file, taken it would be restored instead.
            if let Some(d) = &self.disk {
                if let Some(old) = mem.entries.remove(&key) {
                    mem.bytes -= old.state.len() as u64;
                }
                drop(mem);
                d.write(key, tokens, state);
            }
            return;
        }
        mem.clock += 1;
        let last_used = mem.clock;
        let entry = MemEntry { tokens, state, last_used, used_at: Instant::now(), from_disk: false };
        if let Some(old) = mem.entries.insert(key, entry) {
            mem.bytes -= old.state.len() as u64;
        }
        mem.bytes += size;
        self.evict_over_budget(mem, None);
    }

    /// Moves the least recently used entries (never `keep`) out of memory
    /// until the budget holds: to disk unless they came from there unchanged.
    fn evict_over_budget(&self, mut mem: std::sync::MutexGuard<'_, MemTier>, keep: Option<CacheKey>) {
        let mut evicted = Vec::new();
        while mem.bytes > self.ram_budget {
            let oldest = mem.entries.iter().filter(|(k, _)| Some(**k) != keep).min_by_key(|(_, e)| e.last_used);
            let Some(oldest) = oldest.map(|(k, _)| *k) else { break };
            let e = mem.entries.remove(&oldest).expect("present");
            mem.bytes -= e.state.len() as u64;
            evicted.push((oldest, e));
        }
        drop(mem);
        for (k, e) in evicted {
            self.counters.evictions[Tier::Memory.index()].fetch_add(1, Relaxed);
            if let (Some(d), false) = (&self.disk, e.from_disk) {
                d.write(k, e.tokens, e.state);
            }
        }
    }

    /// The tokens `key`'s parked cache holds, from memory, else (read into
    /// memory first) from disk. Reading a file blocks: callers on a step
    /// loop find it in memory when [`Self::prefetch`] ran before.
    ///
    /// A slot calls it as it takes `key`'s request: the key is in a slot
    /// until the slot parks it, and a key forgotten before may be parked
    /// again (what the slot holds of it from now on is this request's).
    pub fn tokens_of(&self, key: CacheKey) -> Option<Vec<LlamaToken>> {
        {
            let mut mem = self.mem();
            mem.forgotten.remove(&key);
            if mem.in_slots.len() >= MAX_DELETED {
                mem.in_slots.clear();
            }
            mem.in_slots.insert(key);
        }
        if !self.prefetch(key) {
            return None;
        }
        self.mem().entries.get(&key).map(|e| e.tokens.clone())
    }

    /// Reads `key`'s file (if any, and valid) into the memory tier, so that
    /// the step loop only copies from memory. Returns whether it is in
    /// memory. It stays there even past the budget (a memory tier of 0
    /// included) until its request takes it, moments later.
    pub fn prefetch(&self, key: CacheKey) -> bool {
        {
            let mut guard = self.mem();
            let mem = &mut *guard;
            self.expire_memory(mem, false);
            if let Some(e) = mem.entries.get(&key) {
                if !self.outlived(e.used_at) {
                    return true;
                }
                // Past its lifetime since the last sweep.
                mem.bytes -= e.state.len() as u64;
                mem.entries.remove(&key);
                self.counters.expired.fetch_add(1, Relaxed);
            }
        }
        let Some(d) = &self.disk else { return false };
        let reading = Instant::now();
        let Some((tokens, state)) = d.read(key) else { return false };
        self.times.lock().unwrap_or_else(|e| e.into_inner()).2.observe(reading.elapsed().as_secs_f64());
        let mut mem = self.mem();
        if mem.entries.contains_key(&key) {
            return true;
        }
        mem.clock += 1;
        let last_used = mem.clock;
        mem.bytes += state.len() as u64;
        mem.entries.insert(key, MemEntry { tokens, state, last_used, used_at: Instant::now(), from_disk: true });
        self.evict_over_budget(mem, Some(key));
        true
    }

    /// Takes `key`'s parked cache out of memory (it goes into a slot).
    pub fn take(&self, key: CacheKey) -> Option<Parked> {
        let mut mem = self.mem();
        let e = mem.entries.remove(&key)?;
        mem.bytes -= e.state.len() as u64;
        let tier = if e.from_disk { Tier::Disk } else { Tier::Memory };
        Some(Parked { tokens: e.tokens, state: e.state, tier })
    }

    /// Forgets a deleted conversation's cache everywhere (in whatever
    /// namespace), and parks nothing of it again.
    pub fn forget_conversation(&self, conversation: u64) {
        {
            let mut guard = self.mem();
            let mem = &mut *guard;
            mem.entries.retain(|k, e| {
                let keep = k.conversation != conversation;
                if !keep {
                    mem.bytes -= e.state.len() as u64;
                }
                keep
            });
            if mem.deleted.len() >= MAX_DELETED {
                mem.deleted.clear();
            }
            mem.deleted.insert(conversation);
        }
        if let Some(d) = &self.disk {
            d.remove_conversation(conversation);
        }
    }

    /// Forgets `key`'s cache (a stateless conversation deleted by its id):
    /// from memory and disk, and a write of it queued before this call never
    /// lands. A slot may still hold it: the slot does not park it again,
    /// unless a request of the key starts first (whose cache it then is).
    /// Other keys of the conversation (other namespaces) are kept. Returns
    /// whether there was a cache of the key (in memory, on disk, or, as far
    /// as the tiers know, in a slot).
    pub fn forget_key(&self, key: CacheKey) -> bool {
        let mut found = {
            let mut mem = self.mem();
            let mut found = mem.in_slots.remove(&key);
            if let Some(e) = mem.entries.remove(&key) {
                mem.bytes -= e.state.len() as u64;
                found = true;
            }
            if mem.forgotten.len() >= MAX_DELETED {
                mem.forgotten.clear();
            }
            mem.forgotten.insert(key);
            found
        };
        if let Some(d) = &self.disk {
            found |= d.remove_key(key);
        }
        found
    }

    /// Whether an entry last used at `at` has outlived the lifetime.
    fn outlived(&self, at: Instant) -> bool {
        self.ttl.is_some_and(|(ttl, _)| at.elapsed() > ttl)
    }

    /// Drops the memory entries unused past the lifetime (not written to
    /// disk): once per sweep interval, checked as caches are parked and
    /// asked for, and (`now`) at shutdown before anything is written.
    fn expire_memory(&self, mem: &mut MemTier, now: bool) {
        let Some((_, every)) = self.ttl else { return };
        if !now && mem.swept_at.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        mem.swept_at = Some(Instant::now());
        let (before, mut freed) = (mem.entries.len(), 0);
        mem.entries.retain(|_, e| {
            let keep = !self.outlived(e.used_at);
            if !keep {
                freed += e.state.len() as u64;
            }
            keep
        });
        mem.bytes -= freed;
        self.counters.expired.fetch_add((before - mem.entries.len()) as u64, Relaxed);
    }

    /// Counts a request's prompt: `cached` tokens from `tier` (none: a
    /// miss), `decoded` read from the prompt; `took` the restore's copy.
    pub fn record(&self, tier: Option<Tier>, cached: u64, decoded: u64, took: Option<Duration>) {
        match tier {
            Some(t) => {
                self.counters.restores[t.index()].fetch_add(1, Relaxed);
                self.counters.restored_tokens[t.index()].fetch_add(cached, Relaxed);
            }
            None => {
                self.counters.misses.fetch_add(1, Relaxed);
            }
        }
        self.counters.decoded_tokens.fetch_add(decoded, Relaxed);
        if let Some(took) = took {
            self.times.lock().unwrap_or_else(|e| e.into_inner()).1.observe(took.as_secs_f64());
        }
    }

    /// An instance's step loop starts (shutdown waits for it to park its slots).
    pub fn instance_started(&self) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// An instance's step loop has ended, its slots parked.
    pub fn instance_closed(&self) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        *live = live.saturating_sub(1);
        self.live_changed.notify_all();
    }

    /// At shutdown: waits (at most `wait`) for the instances to park their
    /// slots, then writes every cache still in memory to disk and waits for
    /// the writes. Returns the number of caches written.
    pub fn persist(&self, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(instances = *live, "shutdown: instances still decoding; their slots are not saved");
                break;
            }
            live = self.live_changed.wait_timeout(live, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(live);
        let Some(d) = &self.disk else { return 0 };
        let entries: Vec<(CacheKey, MemEntry)> = {
            let mut mem = self.mem();
            self.expire_memory(&mut mem, true);
            mem.bytes = 0;
            mem.entries.drain().collect()
        };
        // The writer's queue first, then every entry written here, one by
        // one: the queue's bound (it skips writes while far behind) must not
        // drop caches at shutdown.
        d.flush();
        let mut n = 0;
        for (k, e) in entries {
            if !e.from_disk && d.write_sync(k, &e.tokens, &e.state) {
                n += 1;
            }
        }
        n
    }

    /// Waits until the disk writes queued so far are done (tests, shutdown).
    pub fn flush(&self) {
        if let Some(d) = &self.disk {
            d.flush();
        }
    }

    pub fn status(&self) -> KvStatus {
        let (entries, bytes) = {
            let mem = self.mem();
            (mem.entries.len(), mem.bytes)
        };
        let c = &self.counters;
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        KvStatus {
            bytes_per_token: self.bytes_per_token.load(Relaxed),
            memory: MemoryStatus {
                entries,
                bytes,
                budget_bytes: self.ram_budget,
                hits: c.restores[Tier::Memory.index()].load(Relaxed),
                expired: c.expired.load(Relaxed),
            },
            disk: match &self.disk {
                Some(d) => d.status(c.restores[Tier::Disk.index()].load(Relaxed)),
                None => DiskStatus::off(),
            },
            restores: TierCounts::read(&c.restores),
            restored_tokens: TierCounts::read(&c.restored_tokens),
            decoded_tokens: c.decoded_tokens.load(Relaxed),
            evictions: {
                let mut t = TierCounts::read(&c.evictions);
                t.disk = self.disk.as_ref().map_or(0, |d| d.evictions());
                t
            },
            misses: c.misses.load(Relaxed),
            parks: c.parks.load(Relaxed),
            moves: c.moves.load(Relaxed),
            copy_seconds: CopyTimes {
                bounds: COPY_BOUNDS.to_vec(),
                park: times.0.snapshot(),
                restore: times.1.snapshot(),
                disk_read: times.2.snapshot(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
