//! Shared set-up for the integration tests: the real default model, one
//! engine per test binary (weights loaded once), small pools.
#![allow(dead_code)]

pub mod haproxy;
pub mod hostile;
pub mod http;
pub mod llama_server;
pub mod postgres;
pub mod process;
pub mod server;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use modelpool_actors::{
    ChatMessage, ChatOptions, GenerateRequest, InstanceOptions, LlamaEngine, PoolHandle, PoolOptions, PoolStatus,
    SamplingParams,
};

/// The default chat model, fetched by scripts/setup.sh.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("MODELPOOL_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let models = std::env::var_os("MODELPOOL_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models"));
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "test model {} is missing: run scripts/setup.sh first", path.display());
    path
}

/// The embedding model, converted by scripts/setup.sh.
pub fn embed_model_path() -> PathBuf {
    let path = std::env::var_os("MODELPOOL_TEST_EMBED_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models/all-MiniLM-L6-v2.Q8_0.gguf")
    });
    assert!(path.is_file(), "embedding model {} is missing: run scripts/setup.sh first", path.display());
    path
}

/// Runs `tests/fixtures/<script>` with the set-up's Python (its venv holds
/// OpenAI's and Ollama's clients and jsonschema), given `arg`; panics with
/// its output when it fails.
pub fn run_python_fixture(script: &str, arg: &str) {
    let venv = std::env::var_os("MODELPOOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/venv"));
    let python = venv.join("bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh", python.display());
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(script);
    let out = std::process::Command::new(python).arg(path).arg(arg).output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The modelpool binary on the test models, with no outside config or
/// profile leaking in; all three standard streams piped or silenced by the caller.
pub fn modelpool_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_modelpool"));
    cmd.env("MODELPOOL_MODEL", model_path())
        .env("MODELPOOL_EMBEDDING_MODEL", embed_model_path())
        .env_remove("MODELPOOL_CONFIG")
        .env_remove("MODELPOOL_PROFILE");
    cmd
}

/// One engine for the whole test binary: the weights are loaded once.
pub fn engine() -> Arc<LlamaEngine> {
    static ENGINE: OnceLock<Arc<LlamaEngine>> = OnceLock::new();
    ENGINE.get_or_init(|| LlamaEngine::load(model_path()).expect("load the test model")).clone()
}

pub fn options(instances: usize, max_queue: usize) -> PoolOptions {
    PoolOptions {
        instances,
        max_queue,
        acquire_timeout: Duration::from_secs(60),
        max_generation: Duration::from_secs(120),
        health_interval: Duration::ZERO,
        instance: InstanceOptions::single(512, 1),
        remotes: Vec::new(),
        max_per_client: 0,
    }
}

/// `instances` instances of `slots` sequences each, on 2 threads apiece.
pub fn slotted(instances: usize, slots: u32, max_queue: usize) -> PoolOptions {
    PoolOptions {
        instance: InstanceOptions { slots, ..InstanceOptions::single(1024, 2) },
        remotes: Vec::new(),
        max_per_client: 0,
        ..options(instances, max_queue)
    }
}

pub async fn start(opts: PoolOptions) -> PoolHandle {
    PoolHandle::start(engine(), opts, Arc::new(|_| {})).await.expect("pool starts")
}

/// The test binary's one lock, held until the guard drops: for scenarios
/// that must not run beside each other while the harness runs tests in
/// parallel. One that panicked holding it does not fail the others.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A greedy request of `messages`: the same reply on every run.
pub fn greedy(messages: Vec<ChatMessage>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { messages, sampling: SamplingParams::greedy(max_tokens), ..Default::default() }
}

/// A greedy request of one user message.
pub fn request(text: &str, max_tokens: u32) -> GenerateRequest {
    greedy(vec![ChatMessage::user(text)], max_tokens)
}

/// Chat settings keeping `recent` messages in the prompt, replying greedily.
pub fn chat_options(recent: usize, max_tokens: u32) -> ChatOptions {
    ChatOptions { recent_messages: recent, sampling: SamplingParams::greedy(max_tokens), ..ChatOptions::default() }
}

/// Polls `cond` until it holds; panics naming `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not reached within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the pool status until `cond` holds; panics with the last status after `limit`.
pub async fn wait_for(pool: &PoolHandle, limit: Duration, cond: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = pool.status().await.expect("status");
        if cond(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("condition not reached within {limit:?}; last status: {s:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where Debian's fortunes live (the test tools of `scripts/setup.sh` install them).
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// The first `n` distinct fortunes (20 to 400 characters, whitespace
/// folded), in file order: real text that is not about any test's facts.
pub fn fortunes(n: usize) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(FORTUNES_DIR)
        .unwrap_or_else(|e| {
            panic!("{FORTUNES_DIR}: {e} (scripts/setup.sh --with-test-tools installs Debian's fortunes)")
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none())
        .collect();
    files.sort();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        for t in String::from_utf8_lossy(&bytes).split("\n%\n") {
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            if (20..=400).contains(&t.len()) && seen.insert(t.clone()) {
                out.push(t);
                if out.len() == n {
                    return out;
                }
            }
        }
    }
    assert_eq!(out.len(), n, "{FORTUNES_DIR} holds only {} usable fortunes", out.len());
    out
}
