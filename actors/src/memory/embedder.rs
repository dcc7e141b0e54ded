//! The embedder actor: a llama.cpp embedding context on its own arbiter
//! thread (blocking work stays off the executor), behind a cloneable handle
//! that bounds every call with a timeout and restarts the actor on a fresh
//! context (same weights) when it hangs or its thread dies.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use llama_cpp_2::model::LlamaModel;
use serde::Serialize;
use tokio::sync::{oneshot, Mutex};

use crate::engine::embed::{embed_tokens, load_embedding_model, token_limit, LlamaEmbedder};
#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::error::EngineError;

/// Texts per message to the actor: a large request is cut into calls of this
/// size, so that chat turns' embeddings interleave with it and each call's
/// timeout stays meaningful.
const TEXTS_PER_CALL: usize = 8;

/// Default longest wait for one call of up to [`TEXTS_PER_CALL`] texts.
pub const DEFAULT_EMBED_TIMEOUT: Duration = Duration::from_secs(10);

/// Embeds texts; one unit vector per text, in order.
#[derive(Message)]
#[rtype(result = "Result<Vec<Vec<f32>>, EngineError>")]
pub struct Embed(pub Vec<String>);

/// Test hook: the next embedding fails, panics or stalls.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectEmbedFault(pub Fault);

pub struct EmbedderActor {
    embedder: LlamaEmbedder,
}

impl Actor for EmbedderActor {
    type Context = Context<Self>;
}

impl Handler<Embed> for EmbedderActor {
    type Result = Result<Vec<Vec<f32>>, EngineError>;

    fn handle(&mut self, msg: Embed, _: &mut Self::Context) -> Self::Result {
        msg.0.iter().map(|t| self.embedder.embed(t)).collect()
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<InjectEmbedFault> for EmbedderActor {
    type Result = ();

    fn handle(&mut self, msg: InjectEmbedFault, _: &mut Self::Context) {
        self.embedder.fault.set(msg.0);
    }
}

/// The embedder's health, for readiness and `/pool`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EmbedderHealth {
    /// False while a restart failed and none has succeeded since.
    pub healthy: bool,
    /// Times the embedder was restarted (timeouts, dead threads).
    pub restarts: u64,
    pub last_error: Option<String>,
}

struct Running {
    addr: Addr<EmbedderActor>,
    arbiter: Arbiter,
    /// Bumped at each restart, so that two callers seeing one failure restart once.
    generation: u64,
}

struct Shared {
    model: &'static LlamaModel,
    threads: u32,
    running: Mutex<Running>,
    health: std::sync::Mutex<EmbedderHealth>,
}

/// A running embedder.
#[derive(Clone)]
pub struct EmbedderHandle {
    shared: Arc<Shared>,
    dim: usize,
    model_name: String,
    timeout: Duration,
}

/// Starts an embedding context for `model` on a fresh arbiter thread.
async fn spawn(model: &'static LlamaModel, threads: u32) -> Result<(Addr<EmbedderActor>, Arbiter, usize), EngineError> {
    let (tx, rx) = oneshot::channel();
    let arbiter = Arbiter::new();
    arbiter.spawn_fn(move || {
        let result = LlamaEmbedder::on(model, threads).map(|embedder| {
            let dim = embedder.dim();
            (EmbedderActor { embedder }.start(), dim)
        });
        let _ = tx.send(result);
    });
    match rx.await {
        Ok(Ok((addr, dim))) => Ok((addr, arbiter, dim)),
        Ok(Err(e)) => {
            arbiter.stop();
            Err(e)
        }
        Err(_) => Err(EngineError::Embed("the embedder's thread died while starting".into())),
    }
}

impl EmbedderHandle {
    /// Loads the embedding model and starts its context on a dedicated thread.
    /// Inside an actix system.
    pub async fn start(path: &Path, threads: u32) -> Result<Self, EngineError> {
        let owned = path.to_path_buf();
        let model = actix_web::rt::task::spawn_blocking(move || load_embedding_model(&owned))
            .await
            .map_err(|_| EngineError::Embed("the embedding model's loader panicked".into()))??;
        let (addr, arbiter, dim) = spawn(model, threads).await?;
        let model_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        tracing::info!(model = %path.display(), dim, "embedding model loaded");
        let shared = Arc::new(Shared {
            model,
            threads,
            running: Mutex::new(Running { addr, arbiter, generation: 0 }),
            health: std::sync::Mutex::new(EmbedderHealth { healthy: true, ..Default::default() }),
        });
        Ok(Self { shared, dim, model_name, timeout: DEFAULT_EMBED_TIMEOUT })
    }

    /// Sets the longest wait for one call of up to 8 texts.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
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
        self.shared.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One unit vector per text, in order. Each call of up to 8 texts has the
    /// timeout; a call that times out or finds the thread dead restarts the
    /// embedder and fails with [`EngineError::Embed`].
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(TEXTS_PER_CALL) {
            out.extend(self.call(chunk.to_vec()).await?);
        }
        Ok(out)
    }

    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let mut v = self.embed(vec![text.to_string()]).await?;
        v.pop().ok_or_else(|| EngineError::Embed("no vector returned".into()))
    }

    async fn call(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        let (addr, generation) = {
            let running = self.shared.running.lock().await;
            (running.addr.clone(), running.generation)
        };
        let failure = match tokio::time::timeout(self.timeout, addr.send(Embed(texts))).await {
            Ok(Ok(result)) => return result,
            Ok(Err(_)) => "the embedder's thread died".to_string(),
            Err(_) => format!("the embedder did not answer within embed_timeout_ms ({} ms)", self.timeout.as_millis()),
        };
        tracing::error!(error = %failure, "embedder failed; restarting it");
        self.restart(generation, &failure).await;
        Err(EngineError::Embed(format!("{failure}; it is being restarted, retry shortly")))
    }

    /// Replaces the actor of `generation` (if no one did yet) with a fresh context.
    async fn restart(&self, generation: u64, cause: &str) {
        let mut running = self.shared.running.lock().await;
        if running.generation != generation {
            return;
        }
        let result = spawn(self.shared.model, self.shared.threads).await;
        let mut health = self.shared.health.lock().unwrap_or_else(|e| e.into_inner());
        health.last_error = Some(cause.to_string());
        match result {
            Ok((addr, arbiter, _)) => {
                // A stuck call finishes first; the old thread then exits and frees its context.
                running.arbiter.stop();
                *running = Running { addr, arbiter, generation: generation + 1 };
                health.healthy = true;
                health.restarts += 1;
                tracing::info!(restarts = health.restarts, "embedder restarted");
            }
            Err(e) => {
                health.healthy = false;
                health.last_error = Some(format!("{cause}; restart failed: {e}"));
                tracing::error!(error = %e, "embedder restart failed; the next call retries");
            }
        }
    }

    /// Test hook: makes the embedder's next embedding misbehave.
    #[cfg(feature = "fault-injection")]
    pub async fn inject_fault(&self, fault: Fault) {
        self.shared.running.lock().await.addr.do_send(InjectEmbedFault(fault));
    }
}
