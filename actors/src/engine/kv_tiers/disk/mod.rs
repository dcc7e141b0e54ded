//! The disk tier: one file per conversation under `<data_dir>/kv/`, written
//! by a thread of its own (a decode step never waits for the disk), to a
//! temporary name, flushed to the disk and then renamed. Each file carries a
//! fingerprint of what produced it (the model file, the KV layout, the
//! llama.cpp build) in its name and header, and a checksum; a file that is
//! torn, corrupted or foreign is never restored: it is deleted, logged once
//! and counted. The directory and its files are the service user's only
//! (0700, 0600): a cache holds conversations.
//!
//! A failed write (a disk full for a moment) drops that cache, is logged and
//! counted, and writing goes on; writes that keep failing pause writing for
//! [`PAUSE`], then it is tried again. The service goes on either way.
//!
//! Several processes may share the directory (replicas on one data
//! directory): each holds a shared lock on it while it runs, and only a
//! process that finds the directory unlocked at start-up deletes what is not
//! its own (another model's files, unfinished writes of any age).
//!
//! With a lifetime (`kv_disk_ttl_s`), a file neither written nor read for
//! longer than it is deleted: at start-up, by the writer thread every
//! [`sweep_interval`], and when it is asked for. A file's modification time
//! is its last use (a read touches it), so the lifetime holds across restarts
//! and for files another process on the directory uses.

mod format;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use super::key::{CacheKey, MAX_DELETED};
pub use format::Fingerprint;
use format::{check_header, classify, decode, encode, file_name, Found, Refused, HEADER};

/// Bytes of writes waiting for the writer thread; beyond it a write is skipped.
const MAX_PENDING: u64 = 512 << 20;
/// Failed writes in a row after which writing pauses (one or two, a disk
/// full for a moment, only drop their caches).
const FAILURES_BEFORE_PAUSE: u32 = 3;
/// How long writing pauses then; the first write after it is tried again.
const PAUSE: Duration = Duration::from_secs(30);
/// A temporary file this old is a crashed write's, whichever process made
/// it: a write in progress changes its file far more often.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// Longest time between two sweeps for expired caches.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// How often caches are checked against a lifetime of `ttl`: a quarter of it
/// (a tiny lifetime in a test is seen to), at most every minute.
pub(super) fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(1), MAX_SWEEP_INTERVAL)
}

/// What `/pool` shows of the disk tier.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStatus {
    /// Whether caches are written: not after the directory could not be
    /// made (until a restart), nor while writing pauses after failed writes.
    pub enabled: bool,
    /// Why not: the directory's error, or the last write error and when
    /// writing is tried again.
    pub disabled_cause: Option<String>,
    pub dir: Option<String>,
    pub entries: usize,
    pub bytes: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Files deleted unread: from another model or format (foreign), or
    /// whose checksum or length did not match (corrupt).
    pub rejected_foreign: u64,
    pub rejected_corrupt: u64,
    /// Writes skipped while the writer was behind or writing paused.
    pub skipped_writes: u64,
    /// Writes that failed (each cache dropped, its temporary file removed).
    pub write_errors: u64,
    /// Files deleted because they were not used within the lifetime
    /// (`kv_disk_ttl_s`), at start-up or while running.
    pub expired: u64,
}

impl DiskStatus {
    pub fn off() -> Self {
        Self {
            enabled: false,
            disabled_cause: None,
            dir: None,
            entries: 0,
            bytes: 0,
            budget_bytes: 0,
            hits: 0,
            bytes_written: 0,
            bytes_read: 0,
            rejected_foreign: 0,
            rejected_corrupt: 0,
            skipped_writes: 0,
            write_errors: 0,
            expired: 0,
        }
    }
}

struct FileMeta {
    bytes: u64,
    last_used: u64,
    /// When it was last written or read (its modification time).
    used_at: SystemTime,
}

#[derive(Default)]
struct Index {
    files: HashMap<CacheKey, FileMeta>,
    bytes: u64,
    clock: u64,
    /// Why writing stopped until a restart (no directory, no writer thread).
    disabled: Option<String>,
    /// Failed writes since the last one that landed, and the last error.
    failures: u32,
    last_error: Option<String>,
    /// After [`FAILURES_BEFORE_PAUSE`] failures in a row: when writing resumes.
    retry_at: Option<Instant>,
    /// Conversations deleted in this process: a write of theirs still in the
    /// writer's queue (or in progress) never lands.
    deleted: HashSet<u64>,
    /// Writes asked for so far: each write takes the next number.
    tickets: u64,
    /// Keys forgotten in this process ([`DiskTier::remove_key`]), with the
    /// last ticket given out then: a write of the key with that ticket or an
    /// earlier one (queued before) never lands; a later one does (a stateless
    /// id may be used again after it was deleted).
    forgotten: HashMap<CacheKey, u64>,
}

impl Index {
    fn paused(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// The next write's ticket.
    fn ticket(&mut self) -> u64 {
        self.tickets += 1;
        self.tickets
    }

    /// Whether the write of `key` with `ticket` was asked for before its
    /// conversation was deleted or its key forgotten.
    fn refused(&self, key: CacheKey, ticket: u64) -> bool {
        self.deleted.contains(&key.conversation) || self.forgotten.get(&key).is_some_and(|&t| ticket <= t)
    }
}

#[derive(Default)]
struct Stats {
    written: AtomicU64,
    read: AtomicU64,
    foreign: AtomicU64,
    corrupt: AtomicU64,
    evictions: AtomicU64,
    skipped: AtomicU64,
    write_errors: AtomicU64,
    expired: AtomicU64,
    pending: AtomicU64,
    /// Temporary files named so far (a part of their names).
    temps: AtomicU64,
    warned_foreign: AtomicBool,
    warned_corrupt: AtomicBool,
}

enum Job {
    Write {
        key: CacheKey,
        tokens: Vec<LlamaToken>,
        state: Vec<u8>,
        ticket: u64,
    },
    Flush(Sender<()>),
    /// Tests: the writer waits until the sender of this is dropped.
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>),
}

struct Shared {
    dir: PathBuf,
    budget: u64,
    /// A file unused this long is deleted (none: files live until evicted).
    ttl: Option<Duration>,
    fingerprint: Fingerprint,
    /// Tells this process's temporary files from those of another process
    /// with the same id (process ids repeat in containers and after restarts).
    nonce: u64,
    /// The directory, locked (shared) while the tier runs.
    lock: Option<File>,
    index: Mutex<Index>,
    stats: Stats,
}

pub(super) struct DiskTier {
    shared: Arc<Shared>,
    jobs: Mutex<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
}

/// Makes the directory (its parents as usual, itself for the service user
/// only, an existing one too) and opens it, to lock it.
fn open_dir(dir: &Path) -> std::io::Result<File> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        made => made?,
    }
    let file = File::open(dir)?;
    let meta = file.metadata()?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(0o700)) {
            // Its files are 0600 all the same.
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the KV cache directory private (0700)");
        }
    }
    Ok(file)
}

/// `flock(2)` on a file this process opened; whether it was granted.
fn flock(file: &File, op: libc::c_int) -> bool {
    // SAFETY: a descriptor `file` owns; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), op) == 0 }
}

/// Writes `bytes` to `tmp` (a new file, the service user's only), flushes
/// it to the disk, renames it to `path`, then syncs the directory (best
/// effort) so that the rename lasts too: a crash leaves the old file or the
/// whole new one, never a renamed file whose data never reached the disk.
fn write_file(dir: &Path, tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl DiskTier {
    /// Opens the tier on `dir`; with a `ttl`, files unused that long are
    /// deleted (at this scan too).
    pub(super) fn open(dir: PathBuf, budget: u64, ttl: Option<Duration>, fingerprint: Fingerprint) -> Self {
        let (lock, problem) = match open_dir(&dir) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("cannot create {}: {e}", dir.display()))),
        };
        // Exclusive: no other process uses the directory, this one may clean
        // up. Else shared, once a process cleaning up is done.
        let alone = lock.as_ref().is_some_and(|f| flock(f, libc::LOCK_EX | libc::LOCK_NB));
        if let (Some(f), false) = (&lock, alone) {
            flock(f, libc::LOCK_SH);
        }
        let shared = Arc::new(Shared {
            dir,
            budget,
            ttl,
            fingerprint,
            nonce: uuid::Uuid::new_v4().as_u64_pair().0,
            lock,
            index: Mutex::new(Index::default()),
            stats: Stats::default(),
        });
        match problem {
            Some(cause) => shared.disable(cause),
            None => shared.scan(alone),
        }
        if let (Some(f), true) = (&shared.lock, alone) {
            flock(f, libc::LOCK_SH);
        }
        let (tx, rx) = channel::<Job>();
        let worker = shared.clone();
        let spawned = std::thread::Builder::new().name("kv-disk".into()).spawn(move || {
            // With a lifetime, the writer also sweeps: between jobs once the
            // interval has passed, and while the queue is idle.
            let sweep = worker.ttl.map(sweep_interval);
            let mut swept = Instant::now();
            loop {
                let job = match sweep {
                    Some(every) => match rx.recv_timeout(every.saturating_sub(swept.elapsed())) {
                        Ok(job) => Some(job),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                    None => match rx.recv() {
                        Ok(job) => Some(job),
                        Err(_) => break,
                    },
                };
                match job {
                    Some(Job::Write { key, tokens, state, ticket }) => {
                        let size = state.len() as u64;
                        worker.write_now(key, &tokens, &state, ticket);
                        worker.stats.pending.fetch_sub(size, Relaxed);
                    }
                    Some(Job::Flush(done)) => {
                        let _ = done.send(());
                    }
                    #[cfg(test)]
                    Some(Job::Hold(until)) => {
                        let _ = until.recv();
                    }
                    None => {}
                }
                if sweep.is_some_and(|every| swept.elapsed() >= every) {
                    worker.expire();
                    swept = Instant::now();
                }
            }
        });
        let writer = match spawned {
            Ok(w) => Some(w),
            Err(e) => {
                shared.disable(format!("could not start its writer thread: {e}"));
                None
            }
        };
        Self { shared, jobs: Mutex::new(tx), writer }
    }

    /// Queues a write (skipped while writing is off, paused or far behind,
    /// and for a deleted conversation).
    pub(super) fn write(&self, key: CacheKey, tokens: Vec<LlamaToken>, state: Vec<u8>) {
        let s = &self.shared;
        let ticket = {
            let mut index = s.index();
            if index.disabled.is_some() || index.deleted.contains(&key.conversation) {
                return;
            }
            if index.paused() {
                s.stats.skipped.fetch_add(1, Relaxed);
                return;
            }
            index.ticket()
        };
        let size = state.len() as u64;
        if s.stats.pending.load(Relaxed) + size > MAX_PENDING {
            s.stats.skipped.fetch_add(1, Relaxed);
            return;
        }
        s.stats.pending.fetch_add(size, Relaxed);
        let sent = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Write { key, tokens, state, ticket });
        if sent.is_err() {
            s.stats.pending.fetch_sub(size, Relaxed);
        }
    }

    /// Writes now, on the calling thread (shutdown: nothing is skipped for
    /// lack of room in the writer's queue). Returns whether it landed.
    pub(super) fn write_sync(&self, key: CacheKey, tokens: &[LlamaToken], state: &[u8]) -> bool {
        let ticket = self.shared.index().ticket();
        self.shared.write_now(key, tokens, state, ticket)
    }

    /// Waits for the writes queued before this call.
    pub(super) fn flush(&self) {
        let (tx, rx) = channel();
        if self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Tests: the writer waits (and what is queued after) until the returned
    /// sender is dropped.
    #[cfg(test)]
    fn hold_writer(&self) -> Sender<()> {
        let (tx, rx) = channel();
        let _ = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Hold(rx));
        tx
    }

    /// Reads and checks `key`'s file; a bad one is deleted and counted, an
    /// expired one deleted. A file read counts as used: its modification
    /// time is set to now.
    pub(super) fn read(&self, key: CacheKey) -> Option<(Vec<LlamaToken>, Vec<u8>)> {
        let s = &self.shared;
        let seen = s.index().files.get(&key).map(|m| m.last_used)?;
        let path = s.dir.join(file_name(s.fingerprint, key));
        let gone = |e: std::io::Error| {
            tracing::debug!(file = %path.display(), error = %e, "KV cache file gone");
            s.forget(key);
        };
        let (mut file, modified) = match File::open(&path).and_then(|f| Ok((f.metadata()?.modified()?, f))) {
            Ok((modified, f)) => (f, modified),
            Err(e) => {
                gone(e);
                return None;
            }
        };
        if s.expired(modified) {
            s.expire_file(key, seen);
            return None;
        }
        let mut bytes = Vec::new();
        if let Err(e) = file.read_to_end(&mut bytes) {
            gone(e);
            return None;
        }
        match decode(&bytes, s.fingerprint, key) {
            Ok(found) => {
                s.stats.read.fetch_add(bytes.len() as u64, Relaxed);
                let now = SystemTime::now();
                if let Err(e) = file.set_modified(now) {
                    tracing::debug!(file = %path.display(), error = %e, "cannot touch a KV cache file");
                }
                let mut index = s.index();
                index.clock += 1;
                let clock = index.clock;
                if let Some(m) = index.files.get_mut(&key) {
                    m.last_used = clock;
                    m.used_at = now;
                }
                Some(found)
            }
            Err(why) => {
                s.reject(&path, why);
                s.forget(key);
                None
            }
        }
    }

    /// Deletes the files of `conversation` (in any namespace), and writes
    /// none of it again: a write already queued is dropped by the writer.
    pub(super) fn remove_conversation(&self, conversation: u64) {
        let s = &self.shared;
        let keys: Vec<CacheKey> = {
            let mut index = s.index();
            if index.deleted.len() >= MAX_DELETED {
                index.deleted.clear();
            }
            index.deleted.insert(conversation);
            index.files.keys().filter(|k| k.conversation == conversation).copied().collect()
        };
        for key in keys {
            if s.forget(key) {
                let _ = std::fs::remove_file(s.dir.join(file_name(s.fingerprint, key)));
            }
        }
    }

    /// Deletes `key`'s file (whether or not this process wrote it: another
    /// on the directory may have), and a write of it queued before this
    /// call never lands; one asked for after it does. Returns whether there
    /// was a file.
    pub(super) fn remove_key(&self, key: CacheKey) -> bool {
        let s = &self.shared;
        let indexed = {
            let mut index = s.index();
            if index.forgotten.len() >= MAX_DELETED {
                index.forgotten.clear();
            }
            let last = index.tickets;
            index.forgotten.insert(key, last);
            match index.files.remove(&key) {
                Some(m) => {
                    index.bytes -= m.bytes;
                    true
                }
                None => false,
            }
        };
        let removed = std::fs::remove_file(s.dir.join(file_name(s.fingerprint, key))).is_ok();
        indexed || removed
    }

    pub(super) fn evictions(&self) -> u64 {
        self.shared.stats.evictions.load(Relaxed)
    }

    pub(super) fn status(&self, hits: u64) -> DiskStatus {
        let s = &self.shared;
        let index = s.index();
        let paused = index.paused().then(|| {
            let left = index.retry_at.map_or(0, |at| at.saturating_duration_since(Instant::now()).as_secs());
            format!(
                "{} writes in a row failed (last: {}); retrying in {left} s",
                index.failures,
                index.last_error.as_deref().unwrap_or("?")
            )
        });
        DiskStatus {
            enabled: index.disabled.is_none() && paused.is_none(),
            disabled_cause: index.disabled.clone().or(paused),
            dir: Some(s.dir.display().to_string()),
            entries: index.files.len(),
            bytes: index.bytes,
            budget_bytes: s.budget,
            hits,
            bytes_written: s.stats.written.load(Relaxed),
            bytes_read: s.stats.read.load(Relaxed),
            rejected_foreign: s.stats.foreign.load(Relaxed),
            rejected_corrupt: s.stats.corrupt.load(Relaxed),
            skipped_writes: s.stats.skipped.load(Relaxed),
            write_errors: s.stats.write_errors.load(Relaxed),
            expired: s.stats.expired.load(Relaxed),
        }
    }
}

impl Drop for DiskTier {
    /// Closes the queue and waits for the writer to finish what it holds, so
    /// that the directory's lock is released when the tier is gone (a tier
    /// opened next, in this process or another, may clean up).
    fn drop(&mut self) {
        let (closed, _) = channel();
        drop(std::mem::replace(self.jobs.get_mut().unwrap_or_else(|e| e.into_inner()), closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Shared {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disable(&self, cause: String) {
        let mut index = self.index();
        if index.disabled.is_none() {
            tracing::warn!(dir = %self.dir.display(), %cause, "KV caches are no longer written to disk; the service goes on");
            index.disabled = Some(cause);
        }
    }

    /// Whether a file last used at `used` has outlived the lifetime.
    fn expired(&self, used: SystemTime) -> bool {
        self.ttl.is_some_and(|ttl| used.elapsed().is_ok_and(|age| age > ttl))
    }

    /// Deletes the files unused for longer than the lifetime. The index
    /// names the candidates; a candidate's modification time decides
    /// (another process on the directory may have used it since).
    fn expire(&self) {
        if self.ttl.is_none() {
            return;
        }
        let candidates: Vec<(CacheKey, u64)> = self
            .index()
            .files
            .iter()
            .filter(|(_, m)| self.expired(m.used_at))
            .map(|(k, m)| (*k, m.last_used))
            .collect();
        for (key, seen) in candidates {
            match std::fs::metadata(self.dir.join(file_name(self.fingerprint, key))).and_then(|m| m.modified()) {
                Ok(modified) if !self.expired(modified) => {
                    if let Some(m) = self.index().files.get_mut(&key) {
                        m.used_at = m.used_at.max(modified);
                    }
                }
                Ok(_) => self.expire_file(key, seen),
                Err(_) => {
                    self.forget(key);
                }
            }
        }
    }

    /// Deletes `key`'s expired file and counts it, unless it was written or
    /// read since its index entry was seen (`seen`: its `last_used` then).
    /// All under the index's lock: what `/pool` shows agrees with the
    /// directory, and a write of the key lands after it or not at all.
    fn expire_file(&self, key: CacheKey, seen: u64) {
        let mut index = self.index();
        let Some(m) = index.files.get(&key).filter(|m| m.last_used == seen) else { return };
        index.bytes -= m.bytes;
        index.files.remove(&key);
        let path = self.dir.join(file_name(self.fingerprint, key));
        let _ = std::fs::remove_file(&path);
        self.stats.expired.fetch_add(1, Relaxed);
        drop(index);
        tracing::debug!(file = %path.display(), "KV cache file unused past its lifetime: deleted");
    }

    /// Removes `key` from the index; returns whether it was there.
    fn forget(&self, key: CacheKey) -> bool {
        let mut index = self.index();
        match index.files.remove(&key) {
            Some(m) => {
                index.bytes -= m.bytes;
                true
            }
            None => false,
        }
    }

    /// Deletes a refused file; the first of each kind is logged at warn.
    fn reject(&self, path: &Path, why: Refused) {
        let _ = std::fs::remove_file(path);
        let (count, warned, what) = match why {
            Refused::Foreign => {
                (&self.stats.foreign, &self.stats.warned_foreign, "from another model, KV layout or format")
            }
            Refused::Corrupt => (&self.stats.corrupt, &self.stats.warned_corrupt, "torn or corrupted"),
        };
        count.fetch_add(1, Relaxed);
        if !warned.swap(true, Relaxed) {
            tracing::warn!(file = %path.display(), "a KV cache file is {what}: deleted, not restored (further ones are counted in /metrics)");
        } else {
            tracing::debug!(file = %path.display(), "KV cache file {what}: deleted");
        }
    }

    /// Start-up: this fingerprint's files are indexed (the most recently
    /// written are the most recently used), torn or corrupted ones deleted,
    /// and those unused for longer than the lifetime deleted and counted.
    /// What is not this process's is deleted only when it is `alone` on the
    /// directory: another fingerprint's files (another model's or build's)
    /// and unfinished writes. With other processes on it, they may be
    /// theirs: only temporary files older than [`STALE_TEMP`] go.
    fn scan(&self, alone: bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = match classify(&name, self.fingerprint) {
                Found::Ours(key) => key,
                Found::Temp => {
                    let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    if alone || age.is_some_and(|age| age > STALE_TEMP) {
                        let _ = std::fs::remove_file(&path);
                    }
                    continue;
                }
                Found::Foreign => {
                    if alone {
                        self.reject(&path, Refused::Foreign);
                    }
                    continue;
                }
                Found::Other => continue,
            };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.modified().is_ok_and(|t| self.expired(t)) {
                if std::fs::remove_file(&path).is_ok() {
                    self.stats.expired.fetch_add(1, Relaxed);
                }
                continue;
            }
            let mut head = [0u8; HEADER];
            let header_ok = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)).is_ok();
            match if header_ok { check_header(&head, self.fingerprint, key) } else { Err(Refused::Corrupt) } {
                Ok(()) => found.push((meta.modified().ok(), key, meta.len())),
                Err(why) => self.reject(&path, why),
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        let mut index = self.index();
        for (modified, key, bytes) in found {
            index.clock += 1;
            let last_used = index.clock;
            let used_at = modified.unwrap_or_else(SystemTime::now);
            index.files.insert(key, FileMeta { bytes, last_used, used_at });
            index.bytes += bytes;
        }
        drop(index);
        self.evict_over_budget(None);
    }

    /// A temporary name unique to this process and write.
    fn temp_name(&self, key: CacheKey) -> String {
        let n = self.stats.temps.fetch_add(1, Relaxed);
        format!(".tmp-{}-{:016x}-{n}-{}", std::process::id(), self.nonce, file_name(self.fingerprint, key))
    }

    /// Writes `key`'s file unless writing is off or paused or its
    /// conversation was deleted or its key forgotten after the write was
    /// asked for (`ticket`; also while it was written). Returns whether it
    /// landed.
    fn write_now(&self, key: CacheKey, tokens: &[LlamaToken], state: &[u8], ticket: u64) -> bool {
        {
            let index = self.index();
            if index.disabled.is_some() || index.paused() || index.refused(key, ticket) {
                return false;
            }
        }
        let bytes = encode(self.fingerprint, key, tokens, state);
        let size = bytes.len() as u64;
        if size > self.budget {
            return false;
        }
        let path = self.dir.join(file_name(self.fingerprint, key));
        let tmp = self.dir.join(self.temp_name(key));
        if let Err(e) = write_file(&self.dir, &tmp, &path, &bytes) {
            let _ = std::fs::remove_file(&tmp);
            self.write_failed(&path, e);
            return false;
        }
        self.stats.written.fetch_add(size, Relaxed);
        let deleted = {
            let mut index = self.index();
            self.write_landed(&mut index);
            // Checked under the lock `remove_conversation` and `remove_key`
            // mark deletions under: either they see this file in the index,
            // or this sees the mark.
            let deleted = index.refused(key, ticket);
            if !deleted {
                index.clock += 1;
                let last_used = index.clock;
                let used_at = SystemTime::now();
                if let Some(old) = index.files.insert(key, FileMeta { bytes: size, last_used, used_at }) {
                    index.bytes -= old.bytes;
                }
                index.bytes += size;
            }
            deleted
        };
        if deleted {
            let _ = std::fs::remove_file(&path);
            return false;
        }
        self.evict_over_budget(Some(key));
        true
    }

    /// A write failed: its cache is dropped, the failure counted and logged,
    /// and writing goes on; after [`FAILURES_BEFORE_PAUSE`] in a row it
    /// pauses for [`PAUSE`] (again after each failed retry).
    fn write_failed(&self, path: &Path, e: std::io::Error) {
        self.stats.write_errors.fetch_add(1, Relaxed);
        let failures = {
            let mut index = self.index();
            index.failures += 1;
            index.last_error = Some(e.to_string());
            if index.failures >= FAILURES_BEFORE_PAUSE {
                index.retry_at = Some(Instant::now() + PAUSE);
            }
            index.failures
        };
        if failures == FAILURES_BEFORE_PAUSE {
            tracing::warn!(dir = %self.dir.display(), error = %e, "KV caches are no longer written to disk for {} s after {failures} failed writes in a row; the service goes on", PAUSE.as_secs());
        } else if failures == 1 {
            tracing::warn!(file = %path.display(), error = %e, "a KV cache could not be written to disk: that cache is dropped, writing goes on");
        } else {
            tracing::debug!(file = %path.display(), error = %e, failures, "a KV cache could not be written to disk");
        }
    }

    /// A write landed: failures before it are over.
    fn write_landed(&self, index: &mut Index) {
        if index.failures >= FAILURES_BEFORE_PAUSE {
            tracing::info!(dir = %self.dir.display(), "KV caches are written to disk again");
        }
        index.failures = 0;
        index.last_error = None;
        index.retry_at = None;
    }

    /// Deletes the least recently used files beyond the budget (never `keep`).
    fn evict_over_budget(&self, keep: Option<CacheKey>) {
        loop {
            let victim = {
                let mut index = self.index();
                if index.bytes <= self.budget {
                    return;
                }
                let Some(oldest) = index
                    .files
                    .iter()
                    .filter(|(k, _)| Some(**k) != keep)
                    .min_by_key(|(_, m)| m.last_used)
                    .map(|(k, _)| *k)
                else {
                    return;
                };
                let m = index.files.remove(&oldest).expect("present");
                index.bytes -= m.bytes;
                oldest
            };
            let _ = std::fs::remove_file(self.dir.join(file_name(self.fingerprint, victim)));
            self.stats.evictions.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
