//! The pool as callers see it: a cloneable handle with async methods. The
//! mailbox of [`PoolManager`] is an implementation detail.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{CacheKey, Engine, EngineInfo, InstanceInfo, KvTiers, DEFAULT_INSTANCE_KV_RAM};
use crate::error::{EngineError, PoolError};
use crate::params::{GenerateRequest, PreparedRequest};
use crate::pool::lease::{GenerationStream, Lease};
#[cfg(feature = "fault-injection")]
use crate::pool::manager::InjectInto;
use crate::pool::manager::{
    Acquire, AcquireReply, CancelWait, DescribeInstance, GetStatus, HoldOutside, PoolManager, PoolOptions, ProgressFn,
    ReleaseOutside, Stop, StopAccepting,
};
use crate::pool::state::PoolStatus;

/// A running pool of model instances.
#[derive(Clone)]
pub struct PoolHandle {
    addr: Addr<PoolManager>,
    engine: Arc<dyn Engine>,
    opts: Arc<PoolOptions>,
}

impl PoolHandle {
    /// Starts the pool and waits until every instance is loaded. `progress`
    /// is told about each instance as it loads. Must run inside an actix system.
    pub async fn start(
        engine: Arc<dyn Engine>,
        mut opts: PoolOptions,
        progress: ProgressFn,
    ) -> Result<Self, PoolError> {
        validate(&opts, &engine.info())?;
        // One memory tier for all of the pool's instances unless the caller shares its own.
        if opts.instance.kv.is_none() {
            opts.instance.kv = Some(KvTiers::memory_only(DEFAULT_INSTANCE_KV_RAM * opts.instances.max(1) as u64));
        }
        let (tx, rx) = oneshot::channel();
        let addr = PoolManager::new(engine.clone(), opts.clone(), progress, tx).start();
        rx.await.map_err(|_| PoolError::Startup("the pool manager stopped during start-up".into()))??;
        Ok(Self { addr, engine, opts: Arc::new(opts) })
    }

    pub fn options(&self) -> &PoolOptions {
        &self.opts
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn engine_info(&self) -> EngineInfo {
        self.engine.info()
    }

    /// Waits (FIFO, up to the acquire timeout) for an idle instance.
    pub async fn acquire(&self) -> Result<Lease, PoolError> {
        self.acquire_for(None).await
    }

    /// Like [`Self::acquire`], preferring the idle instance that last served
    /// `affinity` (a conversation): its KV cache holds that prefix.
    pub async fn acquire_for(&self, affinity: Option<u64>) -> Result<Lease, PoolError> {
        self.acquire_as(affinity, None).await
    }

    /// [`Self::acquire_for`] on behalf of `client` (a hash of its API key or
    /// address), who may hold at most its share of slots and queue places
    /// ([`PoolError::ClientLimit`]).
    pub async fn acquire_as(&self, affinity: Option<u64>, client: Option<u64>) -> Result<Lease, PoolError> {
        let started = std::time::Instant::now();
        let mut lease = self.wait_for_lease(affinity, client).await?;
        lease.waited = started.elapsed();
        Ok(lease)
    }

    async fn wait_for_lease(&self, affinity: Option<u64>, client: Option<u64>) -> Result<Lease, PoolError> {
        let reply = self.addr.send(Acquire { affinity, client }).await.map_err(|_| PoolError::ShuttingDown)?;
        let (waiter, rx) = match reply {
            AcquireReply::Granted(lease) => return Ok(lease),
            AcquireReply::Rejected => return Err(PoolError::QueueFull { max_queue: self.opts.max_queue }),
            AcquireReply::ShuttingDown => return Err(PoolError::ShuttingDown),
            AcquireReply::Failed(e) => return Err(e),
            AcquireReply::Queued(w, rx) => (w, rx),
        };
        // Leaves the queue however this wait ends early: timeout, or the caller
        // dropping this future (a client that went away). A grant racing with
        // it is dropped with `rx` and so released.
        let mut place = QueuePlace { addr: &self.addr, waiter, waiting: true };
        let result = match tokio::time::timeout(self.opts.acquire_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PoolError::ShuttingDown),
            Err(_) => {
                return Err(PoolError::AcquireTimeout { timeout_ms: self.opts.acquire_timeout.as_millis() as u64 })
            }
        };
        place.waiting = false;
        result
    }

    /// Runs `wait` (a chat turn waiting for its conversation's earlier turn)
    /// as a queued request: it counts against `max_queue` (else
    /// [`PoolError::QueueFull`]) and gives up after the acquire timeout.
    /// Dropping the returned future gives the place up.
    pub async fn wait_outside<T>(&self, wait: impl std::future::Future<Output = T>) -> Result<T, PoolError> {
        self.addr.send(HoldOutside).await.map_err(|_| PoolError::ShuttingDown)??;
        struct Place<'a>(&'a Addr<PoolManager>);
        impl Drop for Place<'_> {
            fn drop(&mut self) {
                self.0.do_send(ReleaseOutside);
            }
        }
        let _place = Place(&self.addr);
        tokio::time::timeout(self.opts.acquire_timeout, wait)
            .await
            .map_err(|_| PoolError::AcquireTimeout { timeout_ms: self.opts.acquire_timeout.as_millis() as u64 })
    }

    /// The one check of a request before it takes an instance
    /// ([`Engine::prepare`] for this pool's sequences): valid sampling and
    /// grammar, the prompt tokenized, prompt plus `max_tokens` within the
    /// context. Blocking: a tokenizer behind HTTP waits for its answer
    /// ([`Self::prepared`] runs it where waiting is harmless).
    pub fn prepare(&self, request: GenerateRequest) -> Result<PreparedRequest, EngineError> {
        self.engine.prepare(request, self.opts.instance.n_ctx)
    }

    /// [`Self::prepare`] from async code: tokenizing runs on a blocking
    /// thread, never on the caller's executor, whose other requests it would hold up.
    pub async fn prepared(&self, request: GenerateRequest) -> Result<PreparedRequest, EngineError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.prepare(request))
            .await
            .map_err(|_| EngineError::Backend("tokenizing the prompt panicked".into()))?
    }

    /// [`Engine::prepare_tokens`] for a prompt the caller tokenized, on a
    /// blocking thread: a JSON schema is converted and a grammar parsed there.
    pub async fn prepared_tokens(
        &self,
        request: GenerateRequest,
        prompt: Vec<i32>,
    ) -> Result<PreparedRequest, EngineError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.engine.prepare_tokens(request, prompt, this.opts.instance.n_ctx))
            .await
            .map_err(|_| EngineError::Backend("checking the request panicked".into()))?
    }

    /// Checks the request, waits for an instance and starts generating.
    pub async fn generate(&self, request: GenerateRequest) -> Result<GenerationStream, PoolError> {
        self.generate_for(request, None).await
    }

    /// [`Self::generate`] for a conversation: see [`Self::run`].
    pub async fn generate_for(
        &self,
        request: GenerateRequest,
        key: Option<CacheKey>,
    ) -> Result<GenerationStream, PoolError> {
        self.generate_as(request, key, None).await
    }

    /// [`Self::generate_for`] on behalf of `client` ([`Self::acquire_as`]).
    pub async fn generate_as(
        &self,
        request: GenerateRequest,
        key: Option<CacheKey>,
        client: Option<u64>,
    ) -> Result<GenerationStream, PoolError> {
        let request = self.prepared(request).await?;
        self.run_as(request, key, client).await
    }

    /// Waits for an instance and starts a request checked once
    /// ([`Self::prepared`]). A conversation's turns go back to the slot
    /// whose KV cache holds its prefix when that slot is idle, and its
    /// prompt may reuse its own parked cache (memory or disk) and its
    /// namespace's slots, never another namespace's. Without a key the
    /// first two messages name the conversation, in no namespace.
    pub async fn run(&self, request: PreparedRequest, key: Option<CacheKey>) -> Result<GenerationStream, PoolError> {
        self.run_as(request, key, None).await
    }

    /// [`Self::run`] on behalf of `client` ([`Self::acquire_as`]).
    pub async fn run_as(
        &self,
        request: PreparedRequest,
        key: Option<CacheKey>,
        client: Option<u64>,
    ) -> Result<GenerationStream, PoolError> {
        let lease = self.acquire_as(key.map(|k| k.affinity()), client).await?;
        let key = key.unwrap_or_else(|| CacheKey::of_messages("", &request.request().messages));
        // A cache on disk is read into memory here, off the instance's step loop.
        if let Some(tiers) = self.kv_tiers() {
            let _ = tokio::task::spawn_blocking(move || tiers.prefetch(key)).await;
        }
        Ok(lease.run_keyed(request, key, self.opts.max_generation))
    }

    /// The KV tiers shared by the local instances (none without local instances).
    pub fn kv_tiers(&self) -> Option<Arc<KvTiers>> {
        self.opts.instance.kv.clone()
    }

    pub async fn status(&self) -> Result<PoolStatus, PoolError> {
        self.addr.send(GetStatus).await.map_err(|_| PoolError::ShuttingDown)
    }

    /// Weights address and memory of a live instance.
    pub async fn instance_info(&self, instance: usize) -> Option<InstanceInfo> {
        self.addr.send(DescribeInstance(instance)).await.ok().flatten()
    }

    /// Test hook: makes instance `instance` misbehave on its next decode.
    /// Only with the `fault-injection` feature (test builds).
    #[cfg(feature = "fault-injection")]
    pub async fn inject_fault(&self, instance: usize, fault: Fault) -> bool {
        self.addr.send(InjectInto(instance, fault)).await.unwrap_or(false)
    }

    /// Stops admitting; requests already running finish.
    pub async fn stop_accepting(&self) {
        let _ = self.addr.send(StopAccepting).await;
    }

    /// Waits until no instance is busy, at most `timeout`. Returns whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.status().await {
                Ok(s) if s.in_use == 0 => return true,
                Err(_) => return true,
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the pool and frees every context. What the slots and the
    /// memory tier hold is written to the disk tier (when there is one), so
    /// that a restart resumes every conversation warm.
    pub async fn shutdown(&self) {
        self.stop_accepting().await;
        let _ = self.addr.send(Stop).await;
        if let Some(tiers) = self.kv_tiers() {
            let saved = tokio::task::spawn_blocking(move || tiers.persist(PERSIST_WAIT)).await.unwrap_or(0);
            if saved > 0 {
                tracing::info!(caches = saved, "KV caches written to disk for the next start");
            }
        }
    }
}

/// How long shutdown waits for the instances' loops to hand their slots over.
const PERSIST_WAIT: Duration = Duration::from_secs(10);

/// A place in the pool's queue, given up when dropped while still waiting.
struct QueuePlace<'a> {
    addr: &'a Addr<PoolManager>,
    waiter: crate::pool::state::WaiterId,
    waiting: bool,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.addr.do_send(CancelWait(self.waiter));
        }
    }
}

/// Start-up checks of pool settings against the model; each message names the setting.
fn validate(opts: &PoolOptions, info: &EngineInfo) -> Result<(), PoolError> {
    let bad = |m: String| Err(PoolError::Startup(m));
    if opts.members() == 0 {
        return bad("instances must be at least 1 when no [[remote]] is configured, got 0".into());
    }
    if opts.instance.n_ctx < 16 {
        return bad(format!("n_ctx must be at least 16, got {}", opts.instance.n_ctx));
    }
    if info.n_ctx_train > 0 && opts.instance.n_ctx > info.n_ctx_train {
        return bad(format!(
            "n_ctx {} is larger than the model's training context of {} tokens ({})",
            opts.instance.n_ctx, info.n_ctx_train, info.model_name
        ));
    }
    if opts.instance.n_threads == 0 {
        return bad("threads must be at least 1, got 0".into());
    }
    if opts.acquire_timeout.is_zero() {
        return bad("acquire_timeout_ms must be at least 1".into());
    }
    if opts.max_generation.is_zero() {
        return bad("max_generation_ms must be at least 1".into());
    }
    Ok(())
}
