//! The llama.cpp engine: one process-wide backend, weights loaded once and
//! shared (`&'static`) by every instance; each instance owns one context.

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

use super::fault::FaultSlot;
use super::generate::{probe_context, run_generation};
use super::kv_cache::SeqCaches;
use super::prompt::{tokenize_chat, ChatTemplate};
#[cfg(feature = "fault-injection")]
use super::Fault;
use super::{Engine, EngineInfo, InstanceBackend, InstanceInfo, InstanceOptions};
use crate::error::EngineError;
use crate::params::{ChatMessage, Completion, GenerateRequest};

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
static BACKEND_INIT: Mutex<()> = Mutex::new(());
/// Context creation mutates the model in llama.cpp: never do two at once.
pub(crate) static CONTEXT_CREATION: Mutex<()> = Mutex::new(());

/// The process-wide llama.cpp backend (initialised once; llama.cpp logs go to tracing).
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let _guard = BACKEND_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| EngineError::Backend(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| b))
}

/// Checks that `path` is a readable GGUF file before llama.cpp sees it, so that
/// a wrong path or a non-GGUF file gives a clear error instead of a crash.
pub fn check_model_file(path: &Path) -> Result<(), EngineError> {
    let fail = |reason: String| EngineError::ModelFile { path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it ({e})")))?;
    if !meta.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| fail(format!("cannot read its header ({e})")))?;
    if &magic != b"GGUF" {
        return Err(fail(format!("is not a GGUF model (starts with {magic:02x?}, expected \"GGUF\")")));
    }
    Ok(())
}

/// Loads a model with the usual checks; the weights are memory-mapped.
pub fn load_model(path: &Path) -> Result<LlamaModel, EngineError> {
    check_model_file(path)?;
    let backend = backend()?;
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|_| EngineError::ModelLoad { path: path.to_path_buf() })
}

fn context_params(opts: &InstanceOptions) -> LlamaContextParams {
    let threads = opts.n_threads.max(1) as i32;
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(opts.n_ctx))
        .with_n_batch(512.min(opts.n_ctx))
        .with_n_ubatch(512.min(opts.n_ctx))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // A few sequences keep conversations' caches between requests, one more
        // is the health probe's scratch space. One unified buffer: any sequence
        // can still use the whole n_ctx (others are evicted when it must).
        .with_n_seq_max(super::kv_cache::N_SEQ_MAX)
        .with_kv_unified(true)
}

/// Estimated bytes of a context's KV cache: f16 K and V (llama.cpp's default
/// cache type, which modelpool does not change) for every layer, assuming
/// one head size for K and V. llama.cpp reports no figure for the buffer.
fn kv_bytes(model: &LlamaModel, n_ctx: u32) -> u64 {
    let n_head = model.n_head().max(1) as u64;
    let n_embd_gqa = model.n_embd() as u64 * model.n_head_kv() as u64 / n_head;
    n_ctx as u64 * model.n_layer() as u64 * 2 * n_embd_gqa * 2
}

/// Weights loaded once; every instance decodes with this one copy.
pub struct LlamaEngine {
    path: PathBuf,
    model: &'static LlamaModel,
    template: Arc<ChatTemplate>,
}

impl LlamaEngine {
    /// Loads the weights. They live for the rest of the process: contexts
    /// borrow them, and a pool's weights are needed until exit anyway.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, EngineError> {
        let path = path.as_ref().to_path_buf();
        let model: &'static LlamaModel = Box::leak(Box::new(load_model(&path)?));
        let template = Arc::new(ChatTemplate::from_model(model));
        tracing::info!(
            model = %path.display(),
            weights_bytes = model.size(),
            params = model.n_params(),
            n_ctx_train = model.n_ctx_train(),
            chat_template = template.kind(),
            "model weights loaded once; instances will share them"
        );
        Ok(Arc::new(Self { path, model, template }))
    }

    pub fn model(&self) -> &'static LlamaModel {
        self.model
    }

    /// How prompts are rendered (the model's own Jinja template, or the built-in fallback).
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Address of the shared weights, for checks that they are loaded once.
    pub fn weights_addr(&self) -> usize {
        self.model as *const LlamaModel as usize
    }
}

impl Engine for LlamaEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_name: model_name(&self.path),
            weights_bytes: self.model.size(),
            n_ctx_train: self.model.n_ctx_train(),
            per_request: false,
        }
    }

    fn create_instance(&self, id: usize, opts: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError> {
        let ctx = {
            let _one_at_a_time = CONTEXT_CREATION.lock().unwrap_or_else(|e| e.into_inner());
            self.model.new_context(backend()?, context_params(opts)).map_err(|e| EngineError::Context(e.to_string()))?
        };
        let kv = kv_bytes(self.model, opts.n_ctx);
        tracing::info!(
            instance = id,
            n_ctx = opts.n_ctx,
            threads = opts.n_threads,
            kv_bytes_estimate = kv,
            "instance context created"
        );
        Ok(Box::new(LlamaInstance {
            model: self.model,
            ctx,
            template: self.template.clone(),
            fault: FaultSlot::default(),
            kv_bytes: kv,
            caches: SeqCaches::default(),
        }))
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        Ok(tokenize_chat(self.model, &self.template, messages)?.len() as u32)
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.model.vocab().tokenize(text.as_bytes(), false, false).len() as u32
    }
}

fn model_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// One pooled instance: a context (own KV cache) on the shared weights.
pub struct LlamaInstance {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    template: Arc<ChatTemplate>,
    fault: FaultSlot,
    kv_bytes: u64,
    /// What each cached sequence of the context holds.
    caches: SeqCaches,
}

impl InstanceBackend for LlamaInstance {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        emit: &mut dyn FnMut(&str) -> bool,
        cancel: &AtomicBool,
    ) -> Result<Completion, EngineError> {
        let (ctx, caches) = (&mut self.ctx, &mut self.caches);
        run_generation(ctx, self.model, &self.template, request, emit, cancel, &mut self.fault, caches)
    }

    fn probe(&mut self) -> Result<(), EngineError> {
        probe_context(&mut self.ctx, self.model, &mut self.fault)
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: self.model as *const LlamaModel as usize, kv_bytes_estimate: self.kv_bytes }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault) {
        self.fault.set(fault);
    }
}

/// The comparison mode: every request loads the model and creates a context,
/// as a service without a pool would. Only for benchmarks.
pub struct PerRequestEngine {
    /// Used for token counting only; generation loads its own copy.
    inner: Arc<LlamaEngine>,
}

impl PerRequestEngine {
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, EngineError> {
        Ok(Arc::new(Self { inner: LlamaEngine::load(path)? }))
    }
}

impl Engine for PerRequestEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo { per_request: true, ..self.inner.info() }
    }

    fn create_instance(&self, _id: usize, opts: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError> {
        Ok(Box::new(PerRequestInstance {
            path: self.inner.path.clone(),
            opts: opts.clone(),
            fault: FaultSlot::default(),
        }))
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<u32, EngineError> {
        self.inner.count_prompt_tokens(messages)
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.inner.count_tokens(text)
    }
}

struct PerRequestInstance {
    path: PathBuf,
    opts: InstanceOptions,
    fault: FaultSlot,
}

impl InstanceBackend for PerRequestInstance {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        emit: &mut dyn FnMut(&str) -> bool,
        cancel: &AtomicBool,
    ) -> Result<Completion, EngineError> {
        let started = std::time::Instant::now();
        let model = load_model(&self.path)?;
        let template = ChatTemplate::from_model(&model);
        let mut ctx = {
            let _one_at_a_time = CONTEXT_CREATION.lock().unwrap_or_else(|e| e.into_inner());
            model
                .new_context(backend()?, context_params(&self.opts))
                .map_err(|e| EngineError::Context(e.to_string()))?
        };
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut fresh = SeqCaches::default();
        let mut done = run_generation(&mut ctx, &model, &template, request, emit, cancel, &mut self.fault, &mut fresh)?;
        // The client waited for the load too.
        done.usage.time_to_first_token_ms += load_ms;
        done.usage.total_ms += load_ms;
        Ok(done)
    }

    fn probe(&mut self) -> Result<(), EngineError> {
        check_model_file(&self.path)
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: 0, kv_bytes_estimate: 0 }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault) {
        self.fault.set(fault);
    }
}
