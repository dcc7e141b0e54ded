//! The embedder: a small pool of llama.cpp embedding contexts (same weights),
//! each on a thread of its own, fed from one bounded queue with two
//! priorities. A chat turn's texts go ahead of bulk work (`/v1/embeddings`,
//! imports), and several waiting texts are embedded in one batch. Every call
//! has a timeout; a context that hangs or whose thread dies is replaced by a
//! fresh one.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::model::LlamaModel;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::engine::embed::{embed_tokens, load_embedding_model, token_limit, LlamaEmbedder, BATCH_SEQUENCES};
#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::error::EngineError;

/// Default longest wait for one call (up to 16 texts and 2,048 tokens, queueing included).
pub const DEFAULT_EMBED_TIMEOUT: Duration = Duration::from_secs(10);

/// Default most texts waiting in the queue; past it, calls fail at once with
/// [`EngineError::EmbedQueueFull`].
pub const DEFAULT_EMBED_QUEUE: usize = 4096;

/// Who is waiting: a chat turn (ahead) or bulk work (`/v1/embeddings`, imports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Interactive,
    Bulk,
}

/// Settings of the embedder pool.
#[derive(Clone, Debug)]
pub struct EmbedderOptions {
    /// Embedding contexts, each on its own thread.
    pub contexts: usize,
    /// Threads of each context.
    pub threads: u32,
    /// Longest wait for one call.
    pub timeout: Duration,
    /// Most texts waiting.
    pub max_queued: usize,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        Self { contexts: 1, threads: 1, timeout: DEFAULT_EMBED_TIMEOUT, max_queued: DEFAULT_EMBED_QUEUE }
    }
}

/// The embedder's health, for readiness and `/pool`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EmbedderHealth {
    /// False while a restart failed and none has succeeded since.
    pub healthy: bool,
    /// Times a context was replaced (timeouts, dead threads).
    pub restarts: u64,
    pub last_error: Option<String>,
    /// Texts waiting now.
    pub queued: usize,
    /// Calls being embedded now (taken from the queue, not answered yet).
    pub embedding: usize,
    /// Batches decoded and texts embedded since start.
    pub batches: u64,
    pub texts: u64,
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>;

struct Job {
    id: u64,
    texts: Vec<String>,
    /// Their tokens, as the embedding model counts them (each at most its limit).
    tokens: usize,
    reply: Reply,
}

/// Most tokens in one job (and in one batch of waiting chat texts): about
/// 3 s of work for one thread, well inside the default timeout.
const JOB_TOKENS: usize = 2048;

#[derive(Default)]
struct Queue {
    interactive: VecDeque<Job>,
    bulk: VecDeque<Job>,
    texts: usize,
    stopping: bool,
}

impl Queue {
    /// The next batch: waiting chat texts first (several jobs in one batch),
    /// else one bulk job (bulk calls are cut to one batch each).
    fn take(&mut self) -> Vec<Job> {
        let mut jobs = Vec::new();
        let (mut n, mut tokens) = (0, 0);
        while let Some(job) = self.interactive.front() {
            if !jobs.is_empty() && (n + job.texts.len() > BATCH_SEQUENCES || tokens + job.tokens > JOB_TOKENS) {
                break;
            }
            n += job.texts.len();
            tokens += job.tokens;
            jobs.push(self.interactive.pop_front().expect("front"));
        }
        if jobs.is_empty() {
            jobs.extend(self.bulk.pop_front());
        }
        self.texts -= jobs.iter().map(|j| j.texts.len()).sum::<usize>();
        jobs
    }

    fn remove(&mut self, id: u64) {
        for q in [&mut self.interactive, &mut self.bulk] {
            if let Some(i) = q.iter().position(|j| j.id == id) {
                let job = q.remove(i).expect("position");
                self.texts -= job.texts.len();
            }
        }
    }
}

/// One context's thread, as the pool sees it.
#[derive(Default)]
struct Worker {
    /// Bumped when the worker is replaced; a thread whose generation is old exits.
    generation: u64,
    /// When the batch in progress started, if any.
    busy_since: Option<Instant>,
    /// The ids of the jobs in that batch.
    busy_jobs: Vec<u64>,
    alive: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    model: &'static LlamaModel,
    opts: EmbedderOptions,
    queue: Mutex<Queue>,
    wake: Condvar,
    workers: Mutex<Vec<Worker>>,
    health: Mutex<EmbedderHealth>,
    next_id: AtomicU64,
    /// Longest wait for one call, in milliseconds.
    timeout_ms: AtomicU64,
    batches: AtomicU64,
    texts: AtomicU64,
    #[cfg(feature = "fault-injection")]
    fault: Mutex<Option<Fault>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).stopping = true;
        self.wake.notify_all();
    }
}

/// A running embedder pool; cloning shares it.
#[derive(Clone)]
pub struct EmbedderHandle {
    shared: Arc<Shared>,
    dim: usize,
    model_name: String,
}

/// Marks a worker dead when its thread ends, however it ends.
struct AliveGuard {
    shared: std::sync::Weak<Shared>,
    index: usize,
    generation: u64,
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = workers.get_mut(self.index).filter(|w| w.generation == self.generation) {
                w.alive = false;
                w.busy_since = None;
            }
        }
    }
}

/// Starts worker `index` of `generation` with a fresh context; returns once
/// the context exists (or could not be made).
fn spawn_worker(shared: &Arc<Shared>, index: usize, generation: u64) -> Result<usize, EngineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let weak = Arc::downgrade(shared);
    let (model, threads) = (shared.model, shared.opts.threads);
    let thread = std::thread::Builder::new()
        .name(format!("embedder-{index}"))
        .spawn(move || {
            let embedder = match LlamaEmbedder::on(model, threads) {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(embedder.dim()));
            work(weak, index, generation, embedder);
        })
        .map_err(|e| EngineError::Embed(format!("could not start the embedder's thread: {e}")))?;
    let dim = rx.recv().map_err(|_| EngineError::Embed("the embedder's thread died while starting".into()))??;
    let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
    if workers[index].generation == generation {
        workers[index].thread = Some(thread);
    }
    Ok(dim)
}

/// A worker thread's loop: take a batch, embed it, answer each job.
fn work(weak: std::sync::Weak<Shared>, index: usize, generation: u64, mut embedder: LlamaEmbedder) {
    let _alive = AliveGuard { shared: weak.clone(), index, generation };
    loop {
        // The pool is held only while taking a batch, so that dropping the
        // last handle stops the threads.
        let Some(shared) = weak.upgrade() else { return };
        let jobs = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            let current = shared.workers.lock().unwrap_or_else(|e| e.into_inner())[index].generation;
            if queue.stopping || current != generation {
                return;
            }
            let jobs = queue.take();
            if jobs.is_empty() {
                let _ = shared.wake.wait_timeout(queue, Duration::from_millis(200));
                continue;
            }
            jobs
        };
        {
            let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            if workers[index].generation != generation {
                return; // replaced meanwhile; the jobs' callers retry or time out
            }
            workers[index].busy_since = Some(Instant::now());
            workers[index].busy_jobs = jobs.iter().map(|j| j.id).collect();
        }
        #[cfg(feature = "fault-injection")]
        if let Some(f) = shared.fault.lock().unwrap_or_else(|e| e.into_inner()).take() {
            embedder.fault.set(f);
        }
        let texts: Vec<&str> = jobs.iter().flat_map(|j| j.texts.iter().map(String::as_str)).collect();
        // Do not hold the pool alive while decoding: a dropped handle stops the threads.
        drop(shared);
        let result = embedder.embed_batch(&texts);
        let Some(shared) = weak.upgrade() else { return };
        shared.batches.fetch_add(1, Ordering::Relaxed);
        shared.texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
        {
            let mut workers = shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            if workers[index].generation == generation {
                workers[index].busy_since = None;
                workers[index].busy_jobs.clear();
            }
        }
        match result {
            Ok(mut vectors) => {
                for job in jobs.into_iter().rev() {
                    let mine = vectors.split_off(vectors.len() - job.texts.len());
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl EmbedderHandle {
    /// Loads the embedding model and starts one context of `threads` threads
    /// (see [`Self::start_with`]).
    pub async fn start(path: &Path, threads: u32) -> Result<Self, EngineError> {
        Self::start_with(path, EmbedderOptions { threads, ..Default::default() }).await
    }

    /// Loads the embedding model and starts `opts.contexts` contexts on it.
    pub async fn start_with(path: &Path, opts: EmbedderOptions) -> Result<Self, EngineError> {
        let owned = path.to_path_buf();
        let model = actix_web::rt::task::spawn_blocking(move || load_embedding_model(&owned))
            .await
            .map_err(|_| EngineError::Embed("the embedding model's loader panicked".into()))??;
        let contexts = opts.contexts.max(1);
        let shared = Arc::new(Shared {
            model,
            opts: EmbedderOptions { contexts, ..opts },
            queue: Mutex::default(),
            wake: Condvar::new(),
            workers: Mutex::new((0..contexts).map(|_| Worker { alive: true, ..Default::default() }).collect()),
            health: Mutex::new(EmbedderHealth { healthy: true, ..Default::default() }),
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(opts.timeout.as_millis() as u64),
            batches: AtomicU64::new(0),
            texts: AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            fault: Mutex::default(),
        });
        let mut dim = 0;
        for i in 0..contexts {
            let s = shared.clone();
            dim = actix_web::rt::task::spawn_blocking(move || spawn_worker(&s, i, 0))
                .await
                .map_err(|_| EngineError::Embed("starting the embedder panicked".into()))??;
        }
        let model_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        tracing::info!(model = %path.display(), dim, contexts, threads = shared.opts.threads, "embedding model loaded");
        Ok(Self { shared, dim, model_name })
    }

    /// Sets the longest wait for one call.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.shared.timeout_ms.store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
        self
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn options(&self) -> EmbedderOptions {
        EmbedderOptions { timeout: self.timeout(), ..self.shared.opts.clone() }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.shared.timeout_ms.load(Ordering::Relaxed))
    }

    /// The most tokens one input may have.
    pub fn token_limit(&self) -> usize {
        token_limit(self.shared.model)
    }

    /// Tokens the embedding model sees for `text`, its special tokens included.
    pub fn count_tokens(&self, text: &str) -> usize {
        embed_tokens(self.shared.model, text).len()
    }

    pub fn health(&self) -> EmbedderHealth {
        let mut h = self.shared.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
        h.queued = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).texts;
        h.embedding =
            self.shared.workers.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|w| w.busy_jobs.len()).sum();
        h.batches = self.shared.batches.load(Ordering::Relaxed);
        h.texts = self.shared.texts.load(Ordering::Relaxed);
        h
    }

    /// One unit vector per text, in order, as bulk work: the texts go in
    /// calls of up to 16 texts and 2,048 tokens, each behind any waiting chat
    /// turn, each with the timeout.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        self.embed_as(texts, Priority::Bulk).await
    }

    /// One unit vector per text, in order, at `priority`.
    /// Each call holds up to 16 texts and 2,048 tokens (a longer text alone).
    pub async fn embed_as(&self, texts: Vec<String>, priority: Priority) -> Result<Vec<Vec<f32>>, EngineError> {
        let limit = self.token_limit();
        let mut out = Vec::with_capacity(texts.len());
        let (mut chunk, mut tokens) = (Vec::new(), 0);
        for text in texts {
            let n = self.count_tokens(&text).min(limit);
            if !chunk.is_empty() && (chunk.len() == BATCH_SEQUENCES || tokens + n > JOB_TOKENS) {
                out.extend(self.call(std::mem::take(&mut chunk), tokens, priority).await?);
                tokens = 0;
            }
            chunk.push(text);
            tokens += n;
        }
        if !chunk.is_empty() {
            out.extend(self.call(chunk, tokens, priority).await?);
        }
        Ok(out)
    }

    /// A chat turn's text, ahead of bulk work.
    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let tokens = self.count_tokens(text).min(self.token_limit());
        let mut v = self.call(vec![text.to_string()], tokens, Priority::Interactive).await?;
        v.pop().ok_or_else(|| EngineError::Embed("no vector returned".into()))
    }

    /// Queues one job of at most one batch and waits for it, with the timeout.
    async fn call(&self, texts: Vec<String>, tokens: usize, priority: Priority) -> Result<Vec<Vec<f32>>, EngineError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.stopping {
                return Err(EngineError::Embed("the embedder has stopped (shutting down)".into()));
            }
            let max = self.shared.opts.max_queued;
            if queue.texts + texts.len() > max {
                return Err(EngineError::EmbedQueueFull { max_queued: max });
            }
            queue.texts += texts.len();
            let job = Job { id, texts, tokens, reply: tx };
            match priority {
                Priority::Interactive => queue.interactive.push_back(job),
                Priority::Bulk => queue.bulk.push_back(job),
            }
        }
        self.shared.wake.notify_one();
        let timeout = self.timeout();
        let failure = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => return result,
            Ok(Err(_)) => "the embedder's thread died".to_string(),
            Err(_) => {
                self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                format!("the embedder did not answer within embed_timeout_ms ({} ms)", timeout.as_millis())
            }
        };
        if self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).stopping {
            return Err(EngineError::Embed("the embedder has stopped (shutting down)".into()));
        }
        let replaced = self.replace_failed(id, &failure).await;
        if replaced == 0 {
            // Every context is working and healthy: the queue was too long for the timeout.
            return Err(EngineError::Embed(format!("{failure}: the queue is long; retry shortly")));
        }
        tracing::error!(error = %failure, replaced, "embedder failed; its context was replaced");
        Err(EngineError::Embed(format!("{failure}; it is being restarted, retry shortly")))
    }

    /// Replaces every context that is dead, that holds job `id`, or whose
    /// batch has run past the timeout. Returns how many were replaced.
    async fn replace_failed(&self, id: u64, cause: &str) -> usize {
        let timeout = self.timeout();
        let failed: Vec<(usize, u64)> = {
            let workers = self.shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers
                .iter()
                .enumerate()
                .filter(|(_, w)| {
                    !w.alive || w.busy_jobs.contains(&id) || w.busy_since.is_some_and(|t| t.elapsed() >= timeout)
                })
                .map(|(i, w)| (i, w.generation))
                .collect()
        };
        let mut replaced = 0;
        for (index, generation) in failed {
            {
                let mut workers = self.shared.workers.lock().unwrap_or_else(|e| e.into_inner());
                let w = &mut workers[index];
                if w.generation != generation {
                    continue; // another caller replaced it already
                }
                // The old thread exits when its batch ends; its context goes with it.
                *w = Worker { generation: generation + 1, alive: true, ..Default::default() };
            }
            self.shared.wake.notify_all();
            let shared = self.shared.clone();
            let result = actix_web::rt::task::spawn_blocking(move || spawn_worker(&shared, index, generation + 1))
                .await
                .unwrap_or_else(|_| Err(EngineError::Embed("starting a context panicked".into())));
            let mut health = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(_) => {
                    health.healthy = true;
                    health.restarts += 1;
                    replaced += 1;
                    tracing::info!(restarts = health.restarts, context = index, "embedder context restarted");
                }
                Err(e) => {
                    health.healthy = false;
                    health.last_error = Some(format!("{cause}; restart failed: {e}"));
                    self.shared.workers.lock().unwrap_or_else(|e| e.into_inner())[index].alive = false;
                    tracing::error!(error = %e, "embedder restart failed; the next call retries");
                    continue;
                }
            }
            health.last_error = Some(cause.to_string());
        }
        replaced
    }

    /// Stops every context: waiting calls fail, a batch in progress
    /// finishes, and the threads are joined (a context that hangs is left
    /// behind after the timeout). Later calls fail at once.
    pub async fn shutdown(&self) {
        let dropped: Vec<Job> = {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.stopping = true;
            queue.texts = 0;
            let mut jobs: Vec<Job> = queue.interactive.drain(..).collect();
            jobs.extend(queue.bulk.drain(..));
            jobs
        };
        for job in dropped {
            let _ = job.reply.send(Err(EngineError::Embed("the embedder has stopped (shutting down)".into())));
        }
        self.shared.wake.notify_all();
        let threads: Vec<std::thread::JoinHandle<()>> = {
            let mut workers = self.shared.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.iter_mut().filter_map(|w| w.thread.take()).collect()
        };
        let deadline = Instant::now() + self.timeout();
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }

    /// Test hook: makes the embedder's next batch misbehave.
    #[cfg(feature = "fault-injection")]
    pub async fn inject_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
    }
}
