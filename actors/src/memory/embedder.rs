//! The embedder actor: a llama.cpp embedding context on its own arbiter
//! thread (blocking work stays off the executor), behind a cloneable handle.

use std::path::Path;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::engine::embed::LlamaEmbedder;
use crate::error::EngineError;

/// Embeds texts; one unit vector per text, in order.
#[derive(Message)]
#[rtype(result = "Result<Vec<Vec<f32>>, EngineError>")]
pub struct Embed(pub Vec<String>);

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

/// A running embedder.
#[derive(Clone)]
pub struct EmbedderHandle {
    addr: Addr<EmbedderActor>,
    dim: usize,
    model_name: String,
}

impl EmbedderHandle {
    /// Loads the embedding model on a dedicated thread. Inside an actix system.
    pub async fn start(path: &Path, threads: u32) -> Result<Self, EngineError> {
        let (tx, rx) = oneshot::channel();
        let arbiter = Arbiter::new();
        let owned = path.to_path_buf();
        arbiter.spawn_fn(move || {
            let result = LlamaEmbedder::load(&owned, threads).map(|embedder| {
                let dim = embedder.dim();
                (EmbedderActor { embedder }.start(), dim)
            });
            let _ = tx.send(result);
        });
        let (addr, dim) = rx.await.map_err(|_| EngineError::Embed("embedder thread died while loading".into()))??;
        let model_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        tracing::info!(model = %path.display(), dim, "embedding model loaded");
        Ok(Self { addr, dim, model_name })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EngineError> {
        self.addr.send(Embed(texts)).await.map_err(|_| EngineError::Embed("the embedder's thread died".into()))?
    }

    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let mut v = self.embed(vec![text.to_string()]).await?;
        v.pop().ok_or_else(|| EngineError::Embed("no vector returned".into()))
    }
}
