//! Where an instance comes from: a context on an engine's shared weights,
//! or a remote llama-server. Either way the pool then holds an
//! [`InstanceBackend`].

use std::sync::Arc;

use super::remote::{Expected, RemoteInstance, RemoteSpec};
use super::{Engine, InstanceBackend, InstanceOptions};
use crate::error::EngineError;

/// Where an instance comes from. [`Self::create`] runs on the thread that
/// will own the instance, which it never leaves.
pub enum InstanceSource {
    /// A context (with its batcher) on the engine's shared weights.
    Local { engine: Arc<dyn Engine>, opts: InstanceOptions },
    /// A remote `llama-server`, which must serve the engine's model.
    Remote { engine: Arc<dyn Engine>, spec: RemoteSpec },
}

impl InstanceSource {
    /// Creates the instance: a local context (contexts are created one at a
    /// time), or a remote once it answers and serves the right model
    /// (`/health`, `/props`, `/v1/models`). Must run inside a
    /// [`tokio::task::LocalSet`]: a remote's sequences are local tasks.
    pub async fn create(self, id: usize) -> Result<Box<dyn InstanceBackend>, EngineError> {
        match self {
            Self::Local { engine, opts } => engine.create_instance(id, &opts),
            Self::Remote { engine, spec } => {
                let expect = Expected { model_stem: engine.info().model_name, n_vocab: engine.n_vocab() };
                Ok(Box::new(RemoteInstance::connect(id, spec, expect).await?))
            }
        }
    }
}
