//! The disk tier: one file per conversation under `<data_dir>/kv/`, written
//! by a thread of its own (a decode step never waits for the disk), to a
//! temporary name and then renamed. Each file carries a fingerprint of what
//! produced it (the model file, the KV layout, llama.cpp's state format) and
//! a checksum; a file that is torn, corrupted or foreign is never restored:
//! it is deleted, logged once and counted. When the disk is full or cannot
//! be written, writing stops with one warning and the service goes on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use super::CacheKey;

const MAGIC: &[u8; 8] = b"MPKVv001";
/// magic, fingerprint, namespace, conversation, token count, state length, checksum.
const HEADER: usize = 8 + 8 + 8 + 8 + 4 + 8 + 4;
/// Bytes of writes waiting for the writer thread; beyond it a write is skipped.
const MAX_PENDING: u64 = 512 << 20;

/// What produced a KV state: a file restores only into the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// From the model file (its size and its first 8 MiB: the GGUF header,
    /// metadata and tokenizer) and a description of the KV layout and state
    /// format (cache types, sequence layout, llama.cpp's version).
    pub fn of(model: &Path, layout: &str) -> std::io::Result<Self> {
        use sha2::Digest;
        let mut file = std::fs::File::open(model)?;
        let len = file.metadata()?.len();
        let mut head = Vec::with_capacity(8 << 20);
        (&mut file).take(8 << 20).read_to_end(&mut head)?;
        let mut h = sha2::Sha256::new();
        h.update(len.to_le_bytes());
        h.update(&head);
        h.update(layout.as_bytes());
        let d = h.finalize();
        Ok(Self(u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))))
    }
}

/// What `/pool` shows of the disk tier.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStatus {
    pub enabled: bool,
    /// Why writing stopped (disk full, not writable), if it did.
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
    /// Writes skipped while the writer was behind.
    pub skipped_writes: u64,
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
        }
    }
}

struct FileMeta {
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    files: HashMap<CacheKey, FileMeta>,
    bytes: u64,
    clock: u64,
    disabled: Option<String>,
}

#[derive(Default)]
struct Stats {
    written: AtomicU64,
    read: AtomicU64,
    foreign: AtomicU64,
    corrupt: AtomicU64,
    evictions: AtomicU64,
    skipped: AtomicU64,
    pending: AtomicU64,
    warned_foreign: AtomicBool,
    warned_corrupt: AtomicBool,
}

enum Job {
    Write { key: CacheKey, tokens: Vec<LlamaToken>, state: Vec<u8> },
    Flush(Sender<()>),
}

struct Shared {
    dir: PathBuf,
    budget: u64,
    fingerprint: Fingerprint,
    index: Mutex<Index>,
    stats: Stats,
}

pub(super) struct DiskTier {
    shared: Arc<Shared>,
    jobs: Mutex<Sender<Job>>,
}

fn file_name(key: CacheKey) -> String {
    format!("{:016x}-{:016x}.kv", key.namespace, key.conversation)
}

fn parse_name(name: &str) -> Option<CacheKey> {
    let stem = name.strip_suffix(".kv")?;
    let (ns, conv) = stem.split_once('-')?;
    Some(CacheKey { namespace: u64::from_str_radix(ns, 16).ok()?, conversation: u64::from_str_radix(conv, 16).ok()? })
}

/// A file's whole content: header, tokens (i32 LE), state.
pub(super) fn encode(fingerprint: Fingerprint, key: CacheKey, tokens: &[LlamaToken], state: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(tokens.len() * 4 + state.len());
    for t in tokens {
        body.extend_from_slice(&t.0.to_le_bytes());
    }
    body.extend_from_slice(state);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fingerprint.0.to_le_bytes());
    out.extend_from_slice(&key.namespace.to_le_bytes());
    out.extend_from_slice(&key.conversation.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Why a file was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    Foreign,
    Corrupt,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks the header (magic, fingerprint, key) of a file's first bytes.
fn check_header(b: &[u8], fingerprint: Fingerprint, key: CacheKey) -> Result<(), Refused> {
    if b.len() < HEADER {
        return Err(Refused::Corrupt);
    }
    if &b[..8] != MAGIC || u64_at(b, 8) != fingerprint.0 {
        return Err(Refused::Foreign);
    }
    if u64_at(b, 16) != key.namespace || u64_at(b, 24) != key.conversation {
        return Err(Refused::Corrupt);
    }
    Ok(())
}

/// The tokens and state of a whole file, checked.
pub(super) fn decode(b: &[u8], fingerprint: Fingerprint, key: CacheKey) -> Result<(Vec<LlamaToken>, Vec<u8>), Refused> {
    check_header(b, fingerprint, key)?;
    let n_tokens = u32_at(b, 32) as usize;
    let state_len = u64_at(b, 36) as usize;
    let crc = u32_at(b, 44);
    let body = &b[HEADER..];
    if n_tokens.checked_mul(4).and_then(|t| t.checked_add(state_len)) != Some(body.len()) {
        return Err(Refused::Corrupt);
    }
    if crc32fast::hash(body) != crc {
        return Err(Refused::Corrupt);
    }
    let tokens = body[..n_tokens * 4]
        .chunks_exact(4)
        .map(|c| LlamaToken(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
        .collect();
    Ok((tokens, body[n_tokens * 4..].to_vec()))
}

impl DiskTier {
    pub(super) fn open(dir: PathBuf, budget: u64, fingerprint: Fingerprint) -> Self {
        let shared =
            Arc::new(Shared { dir, budget, fingerprint, index: Mutex::new(Index::default()), stats: Stats::default() });
        shared.scan();
        let (tx, rx) = channel::<Job>();
        let worker = shared.clone();
        let spawned = std::thread::Builder::new().name("kv-disk".into()).spawn(move || {
            for job in rx {
                match job {
                    Job::Write { key, tokens, state } => {
                        let size = state.len() as u64;
                        worker.write_now(key, &tokens, &state);
                        worker.stats.pending.fetch_sub(size, Relaxed);
                    }
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        if let Err(e) = spawned {
            shared.disable(format!("could not start its writer thread: {e}"));
        }
        Self { shared, jobs: Mutex::new(tx) }
    }

    /// Queues a write (skipped while writing is disabled or far behind).
    pub(super) fn write(&self, key: CacheKey, tokens: Vec<LlamaToken>, state: Vec<u8>) {
        let s = &self.shared;
        if s.index().disabled.is_some() {
            return;
        }
        let size = state.len() as u64;
        if s.stats.pending.load(Relaxed) + size > MAX_PENDING {
            s.stats.skipped.fetch_add(1, Relaxed);
            return;
        }
        s.stats.pending.fetch_add(size, Relaxed);
        let sent = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Write { key, tokens, state });
        if sent.is_err() {
            s.stats.pending.fetch_sub(size, Relaxed);
        }
    }

    /// Writes now, on the calling thread (shutdown: nothing is skipped for
    /// lack of room in the writer's queue).
    pub(super) fn write_sync(&self, key: CacheKey, tokens: &[LlamaToken], state: &[u8]) -> bool {
        self.shared.write_now(key, tokens, state);
        self.shared.index().files.contains_key(&key)
    }

    /// Waits for the writes queued before this call.
    pub(super) fn flush(&self) {
        let (tx, rx) = channel();
        if self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Reads and checks `key`'s file; a bad one is deleted and counted.
    pub(super) fn read(&self, key: CacheKey) -> Option<(Vec<LlamaToken>, Vec<u8>)> {
        let s = &self.shared;
        if !s.index().files.contains_key(&key) {
            return None;
        }
        let path = s.dir.join(file_name(key));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "KV cache file gone");
                s.forget(key);
                return None;
            }
        };
        match decode(&bytes, s.fingerprint, key) {
            Ok(found) => {
                s.stats.read.fetch_add(bytes.len() as u64, Relaxed);
                let mut index = s.index();
                index.clock += 1;
                let now = index.clock;
                if let Some(m) = index.files.get_mut(&key) {
                    m.last_used = now;
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

    /// Deletes the files of `conversation` (in any namespace).
    pub(super) fn remove_conversation(&self, conversation: u64) {
        let s = &self.shared;
        let keys: Vec<CacheKey> = s.index().files.keys().filter(|k| k.conversation == conversation).copied().collect();
        for key in keys {
            if s.forget(key) {
                let _ = std::fs::remove_file(s.dir.join(file_name(key)));
            }
        }
    }

    pub(super) fn evictions(&self) -> u64 {
        self.shared.stats.evictions.load(Relaxed)
    }

    pub(super) fn status(&self, hits: u64) -> DiskStatus {
        let s = &self.shared;
        let index = s.index();
        DiskStatus {
            enabled: index.disabled.is_none(),
            disabled_cause: index.disabled.clone(),
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

    /// Start-up: the directory is created; unfinished writes are removed,
    /// files of another model or format deleted, the rest indexed (the most
    /// recently written are the most recently used).
    fn scan(&self) {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            self.disable(format!("cannot create {}: {e}", self.dir.display()));
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                // A write that never finished (a crash); one younger than a
                // minute may be another process's, in progress.
                let stale = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if stale.is_none_or(|age| age > std::time::Duration::from_secs(60)) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(key) = parse_name(&name) else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            let mut head = [0u8; HEADER];
            let header_ok = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut head)).is_ok();
            match if header_ok { check_header(&head, self.fingerprint, key) } else { Err(Refused::Corrupt) } {
                Ok(()) => found.push((meta.modified().ok(), key, meta.len())),
                Err(why) => self.reject(&path, why),
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        let mut index = self.index();
        for (_, key, bytes) in found {
            index.clock += 1;
            let last_used = index.clock;
            index.files.insert(key, FileMeta { bytes, last_used });
            index.bytes += bytes;
        }
        drop(index);
        self.evict_over_budget(None);
    }

    /// On the writer thread: the file under a temporary name, then renamed.
    fn write_now(&self, key: CacheKey, tokens: &[LlamaToken], state: &[u8]) {
        if self.index().disabled.is_some() {
            return;
        }
        let bytes = encode(self.fingerprint, key, tokens, state);
        let size = bytes.len() as u64;
        if size > self.budget {
            return;
        }
        let path = self.dir.join(file_name(key));
        let tmp = self.dir.join(format!(".tmp-{}-{}", std::process::id(), file_name(key)));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            self.disable(format!("writing {} failed: {e}", path.display()));
            return;
        }
        self.stats.written.fetch_add(size, Relaxed);
        {
            let mut index = self.index();
            index.clock += 1;
            let last_used = index.clock;
            if let Some(old) = index.files.insert(key, FileMeta { bytes: size, last_used }) {
                index.bytes -= old.bytes;
            }
            index.bytes += size;
        }
        self.evict_over_budget(Some(key));
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
            let _ = std::fs::remove_file(self.dir.join(file_name(victim)));
            self.stats.evictions.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
