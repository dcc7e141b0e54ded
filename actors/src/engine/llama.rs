//! The llama.cpp engine: one process-wide backend, weights loaded once and
//! shared (`&'static`) by every instance; each instance owns one context.

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

use super::batch::Batcher;
use super::kv_tiers::Fingerprint;
use super::prompt::{tokenize_chat, ChatTemplate};
#[cfg(feature = "fault-injection")]
use super::Fault;
use super::{
    CacheKey, Engine, EngineInfo, InstanceBackend, InstanceInfo, InstanceOptions, KvTiers, ProbeReply, SeqSink,
    SlotStreams,
};
use crate::error::EngineError;
use crate::params::{ChatMessage, FinishReason, PreparedRequest};

/// The llama-cpp-2 release this is built with (pinned in the workspace's
/// Cargo.toml; the Rust wrapper, patched in vendor/). The llama.cpp it
/// links, whose sequence-state format a cache file holds, comes from
/// llama-cpp-sys-2 and is named by [`Fingerprint::of`] itself.
const LLAMA_CPP_2_VERSION: &str = "0.1.160";

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
    load_model_with(path, false)
}

fn load_model_with(path: &Path, vocab_only: bool) -> Result<LlamaModel, EngineError> {
    check_model_file(path)?;
    let backend = backend()?;
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default().with_vocab_only(vocab_only))
        .map_err(|_| EngineError::ModelLoad { path: path.to_path_buf() })
}

/// Cells of a context's KV cache: a stream of `n_ctx` cells for every slot.
fn context_cells(opts: &InstanceOptions) -> u32 {
    opts.n_ctx.saturating_mul(Batcher::sequences(opts.slots.max(1) as usize))
}

fn context_params(opts: &InstanceOptions) -> LlamaContextParams {
    let threads = opts.n_threads.max(1) as i32;
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(context_cells(opts)))
        .with_n_batch(512.min(opts.n_ctx))
        .with_n_ubatch(512.min(opts.n_ctx))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // One sequence per slot, each with a KV stream of its own: a sequence attends only to its own cells, so
        // its cost and its greedy text do not depend on its neighbours in
        // the batch (in one unified buffer they would: longer attention
        // spans, and sums taken in another order).
        .with_n_seq_max(Batcher::sequences(opts.slots.max(1) as usize))
        .with_kv_unified(false)
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
    /// Loaded as a tokenizer only: no instance can run on it.
    vocab_only: bool,
    /// The instances' decode threads and the cores other processes leave free.
    cpu: Arc<super::cpu::CpuMonitor>,
}

impl LlamaEngine {
    /// Loads the weights. They live for the rest of the process: contexts
    /// borrow them, and a pool's weights are needed until exit anyway.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Self>, EngineError> {
        Self::load_with(path, false)
    }

    /// Loads only the tokenizer and chat template (no weights): for a pool
    /// whose instances are all remote. It cannot create instances.
    pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<Arc<Self>, EngineError> {
        Self::load_with(path, true)
    }

    fn load_with(path: impl AsRef<Path>, vocab_only: bool) -> Result<Arc<Self>, EngineError> {
        let path = path.as_ref().to_path_buf();
        let model: &'static LlamaModel = Box::leak(Box::new(load_model_with(&path, vocab_only)?));
        let template = Arc::new(ChatTemplate::from_model(model));
        tracing::info!(
            model = %path.display(),
            weights_bytes = model.size(),
            params = model.n_params(),
            n_ctx_train = model.n_ctx_train(),
            chat_template = template.kind(),
            "model weights loaded once; instances will share them"
        );
        Ok(Arc::new(Self { path, model, template, vocab_only, cpu: super::cpu::CpuMonitor::new() }))
    }

    pub fn model(&self) -> &'static LlamaModel {
        self.model
    }

    /// How prompts are rendered (the model's own Jinja template, or the built-in fallback).
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// KV bytes one token takes in a context (all layers, K and V, f16).
    pub fn kv_bytes_per_token(&self) -> u64 {
        kv_bytes(self.model, 1)
    }

    /// What a saved KV state of this model depends on: the model file, the
    /// KV layout (cache types, one stream per sequence, shapes) and
    /// llama.cpp's state format. A cache file restores only into the same.
    pub fn kv_fingerprint(&self) -> std::io::Result<Fingerprint> {
        let m = self.model;
        let layout = format!(
            "K f16, V f16, one KV stream per sequence, n_layer {}, n_embd {}, n_head {}, n_head_kv {}, \
             state format of llama-cpp-2 {}",
            m.n_layer(),
            m.n_embd(),
            m.n_head(),
            m.n_head_kv(),
            LLAMA_CPP_2_VERSION,
        );
        Fingerprint::of(&self.path, &layout)
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
        if self.vocab_only {
            return Err(EngineError::Context("the model was loaded as a tokenizer only (instances = 0)".into()));
        }
        let ctx = {
            let _one_at_a_time = CONTEXT_CREATION.lock().unwrap_or_else(|e| e.into_inner());
            self.model.new_context(backend()?, context_params(opts)).map_err(|e| EngineError::Context(e.to_string()))?
        };
        let kv = kv_bytes(self.model, context_cells(opts));
        tracing::info!(
            instance = id,
            n_ctx = opts.n_ctx,
            slots = opts.slots,
            threads = opts.n_threads,
            kv_bytes_estimate = kv,
            "instance context created"
        );
        let slots = opts.slots.max(1) as usize;
        let cpu = self.cpu.register(id, opts.n_threads, opts.adapt_threads);
        let tiers = opts.kv_tiers();
        tiers.instance_started();
        let batcher = Batcher::new(self.model, ctx, slots, opts.n_ctx, opts.prefill_chunk as usize, tiers.clone())
            .with_cpu_share(cpu)
            .with_max_pause(opts.max_pause);
        Ok(Box::new(LlamaInstance { weights_addr: self.weights_addr(), batcher, kv_bytes: kv, tiers, closed: false }))
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.model.vocab().tokenize(text.as_bytes(), false, false).len() as u32
    }

    fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        Ok(tokenize_chat(self.model, &self.template, messages)?.into_iter().map(|t| t.0).collect())
    }

    fn n_vocab(&self) -> Option<u32> {
        u32::try_from(self.model.n_vocab()).ok()
    }

    fn check_grammar(&self, gbnf: &str) -> Result<(), EngineError> {
        // llama.cpp's parser recurses: on a thread whose stack the bounds fit.
        let (model, gbnf) = (self.model, gbnf.to_string());
        super::grammar::on_parser_thread("grammar", move || super::sampling::grammar_sampler(model, &gbnf).map(drop))?
    }

    fn raw_prompt_tokens(&self, text: &str) -> Result<Vec<i32>, EngineError> {
        Ok(self.model.vocab().tokenize(text.as_bytes(), true, true).into_iter().map(|t| t.0).collect())
    }

    fn cpu_features(&self) -> Vec<String> {
        cpu_features()
    }

    fn cpu_status(&self) -> Option<super::cpu::CpuStatus> {
        self.cpu.status()
    }
}

/// The CPU features llama.cpp's build uses, from its system info line
/// (`CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | … | AVX512 = 1 | …`): the names
/// set to 1, in its order.
pub fn cpu_features() -> Vec<String> {
    // SAFETY: llama.cpp returns a static, NUL-terminated string.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    parse_system_info(&info.to_string_lossy())
}

fn parse_system_info(info: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in info.split('|') {
        // "CPU : SSE3 = 1" starts a backend's list: keep what follows the colon.
        let part = part.rsplit(" : ").next().unwrap_or(part);
        if let Some((name, value)) = part.split_once('=') {
            let name = name.trim();
            if value.trim() == "1" && !name.is_empty() && !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod system_info_tests {
    #[test]
    fn the_features_set_to_one_are_listed_in_order() {
        let info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 | OPENMP = 1 | REPACK = 1 | ";
        assert_eq!(super::parse_system_info(info), ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "OPENMP", "REPACK"]);
        assert!(super::cpu_features().iter().any(|f| f == "AVX2" || f == "NEON"), "{:?}", super::cpu_features());
    }

    /// scripts/env.sh asks llama.cpp's build for AVX-512 where the CPU has it
    /// (GGML_AVX512=ON); llama.cpp then reports it as in use.
    #[test]
    fn a_build_for_an_avx512_cpu_uses_avx512() {
        let asked = std::env::var("GGML_AVX512").is_ok_and(|v| v == "ON");
        let features = super::cpu_features();
        println!("GGML_AVX512 asked: {asked}; llama.cpp uses {features:?}");
        if asked {
            assert!(
                features.iter().any(|f| f == "AVX512"),
                "built with GGML_AVX512=ON but llama.cpp reports {features:?}"
            );
        }
    }
}

fn model_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// One pooled instance: a context (own KV cache, several sequence slots) on
/// the shared weights.
pub struct LlamaInstance {
    weights_addr: usize,
    batcher: Batcher<'static>,
    kv_bytes: u64,
    tiers: Arc<KvTiers>,
    closed: bool,
}

impl Drop for LlamaInstance {
    fn drop(&mut self) {
        if !self.closed {
            self.tiers.instance_closed();
        }
    }
}

impl InstanceBackend for LlamaInstance {
    fn streams(&self) -> Arc<SlotStreams> {
        self.batcher.streams()
    }

    fn start(&mut self, slot: usize, request: PreparedRequest, key: CacheKey, started: Instant, sink: SeqSink) {
        self.batcher.start(slot, &request, key, started, sink);
    }

    fn close(&mut self) {
        self.batcher.close();
        self.closed = true;
        self.tiers.instance_closed();
    }

    fn cancel(&mut self, slot: usize) {
        if slot < self.batcher.slots() {
            self.batcher.finish(slot, FinishReason::Cancelled);
        }
    }

    fn active(&self) -> usize {
        self.batcher.active()
    }

    fn step(&mut self) -> Result<bool, EngineError> {
        self.batcher.step()
    }

    fn probe(&mut self) -> ProbeReply {
        self.batcher.probe().into()
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: self.weights_addr, kv_bytes_estimate: self.kv_bytes, endpoint: None }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault) {
        self.batcher.inject_fault(fault);
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
            #[cfg(feature = "fault-injection")]
            fault: None,
        }))
    }

    fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        self.inner.prompt_tokens(messages)
    }

    fn n_vocab(&self) -> Option<u32> {
        self.inner.n_vocab()
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.inner.count_tokens(text)
    }

    fn check_grammar(&self, gbnf: &str) -> Result<(), EngineError> {
        self.inner.check_grammar(gbnf)
    }

    fn raw_prompt_tokens(&self, text: &str) -> Result<Vec<i32>, EngineError> {
        self.inner.raw_prompt_tokens(text)
    }
}

struct PerRequestInstance {
    path: PathBuf,
    opts: InstanceOptions,
    #[cfg(feature = "fault-injection")]
    fault: Option<Fault>,
}

impl PerRequestInstance {
    /// Loads the model, makes a context and runs the one sequence to its end.
    /// Its timings start at `started`, before the load: the client waited for it.
    fn run(&mut self, request: &PreparedRequest, started: Instant, sink: &SeqSink) -> Result<(), EngineError> {
        let model = load_model(&self.path)?;
        let opts = InstanceOptions { slots: 1, ..self.opts.clone() };
        let ctx = {
            let _one_at_a_time = CONTEXT_CREATION.lock().unwrap_or_else(|e| e.into_inner());
            model.new_context(backend()?, context_params(&opts)).map_err(|e| EngineError::Context(e.to_string()))?
        };
        // Nothing outlives the request here: no tier to park in.
        let tiers = KvTiers::memory_only(0);
        let mut batcher = Batcher::new(&model, ctx, 1, opts.n_ctx, opts.prefill_chunk as usize, tiers);
        #[cfg(feature = "fault-injection")]
        if let Some(f) = self.fault.take() {
            batcher.inject_fault(f);
        }
        batcher.start(0, request, CacheKey::default(), started, sink.clone());
        // A failed step has already told the sequence; nothing more to send.
        while batcher.active() > 0 {
            match batcher.step() {
                Ok(true) => {}
                // Its reader lags: wait for room.
                Ok(false) => std::thread::sleep(std::time::Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        Ok(())
    }
}

impl InstanceBackend for PerRequestInstance {
    fn streams(&self) -> Arc<SlotStreams> {
        Arc::new(SlotStreams::new(1))
    }

    fn start(&mut self, _slot: usize, request: PreparedRequest, _key: CacheKey, started: Instant, sink: SeqSink) {
        if let Err(e) = self.run(&request, started, &sink) {
            sink.done(Err(e));
        }
    }

    fn cancel(&mut self, _slot: usize) {}

    fn active(&self) -> usize {
        0
    }

    fn step(&mut self) -> Result<bool, EngineError> {
        Ok(false)
    }

    fn probe(&mut self) -> ProbeReply {
        check_model_file(&self.path).into()
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: 0, kv_bytes_estimate: 0, endpoint: None }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }
}
