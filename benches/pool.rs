//! Pool benchmark on the default model. Prints figures; asserts nothing.
//!
//!   cargo bench --bench pool            (scripts/bench.sh does the set-up first)
//!
//! 1. pooled vs per-request: time to first token and total time per request;
//! 2. threads: tokens/s of one instance at 1 and 2 threads, and of 2 instances
//!    × 1 thread decoding together;
//! 3. memory: resident set size with 1 and with 4 instances on one copy of the weights.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpool_actors::{
    ChatMessage, Engine, GenerateRequest, InstanceOptions, LlamaEngine, PerRequestEngine, PoolHandle, PoolOptions,
    SamplingParams,
};

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a hash map is in one paragraph.",
    "Write a haiku about autumn.",
    "How do I boil an egg?",
];

fn model_path() -> PathBuf {
    std::env::var_os("MODELPOOL_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

fn opts(instances: usize, threads: u32) -> PoolOptions {
    PoolOptions {
        instances,
        max_queue: 64,
        acquire_timeout: Duration::from_secs(600),
        max_generation: Duration::from_secs(600),
        health_interval: Duration::ZERO,
        instance: InstanceOptions::single(1024, threads),
        remotes: Vec::new(),
        max_per_client: 0,
    }
}

fn request(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatMessage::user(prompt)],
        sampling: SamplingParams::greedy(max_tokens),
        ..Default::default()
    }
}

async fn pool(engine: Arc<dyn Engine>, instances: usize, threads: u32) -> PoolHandle {
    PoolHandle::start(engine, opts(instances, threads), Arc::new(|_| {})).await.expect("pool starts")
}

/// Runs the prompts one after another; returns (mean TTFT ms, mean total ms) as the client saw them.
async fn per_prompt(pool: &PoolHandle) -> (f64, f64) {
    let (mut ttft, mut total) = (0.0, 0.0);
    for p in PROMPTS {
        let started = Instant::now();
        let (_, done) = pool.generate(request(p, 32)).await.unwrap().collect_text().await.unwrap();
        let wall = started.elapsed().as_secs_f64() * 1e3;
        // Client-side total; TTFT from the engine plus what the client waited before it.
        ttft += done.usage.time_to_first_token_ms + (wall - done.usage.total_ms).max(0.0);
        total += wall;
    }
    (ttft / PROMPTS.len() as f64, total / PROMPTS.len() as f64)
}

/// Decodes `max_tokens` on every instance at once; returns aggregate tokens/s.
async fn throughput(pool: &PoolHandle, streams: usize, max_tokens: u32) -> f64 {
    let mut req = request("Write a long story about a lighthouse keeper.", max_tokens);
    req.sampling.stop.clear();
    let started = Instant::now();
    let mut running = Vec::new();
    for _ in 0..streams {
        running.push(pool.generate(req.clone()).await.unwrap());
    }
    let mut tokens = 0u32;
    for s in running {
        let (_, done) = s.collect_text().await.unwrap();
        tokens += done.usage.completion_tokens;
    }
    tokens as f64 / started.elapsed().as_secs_f64()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Child-process mode: load, start `n` instances, decode on each, print RSS figures.
fn memory_probe(path: PathBuf, n: usize) {
    actix::System::new().block_on(async move {
        let rss0 = modelpool_actors::rss_bytes().unwrap_or(0);
        let engine = LlamaEngine::load(&path).unwrap();
        let rss_weights = modelpool_actors::rss_bytes().unwrap_or(0);
        let p = pool(engine, n, 1).await;
        let _ = throughput(&p, n, 16).await;
        let rss = modelpool_actors::rss_bytes().unwrap_or(0);
        println!("{:.1} {:.1} {:.1}", mib(rss), mib(rss_weights - rss0), mib(rss - rss_weights));
        p.shutdown().await;
    });
}

fn main() {
    let path = model_path();
    if let Some(n) = std::env::var("MODELPOOL_BENCH_MEMORY").ok().and_then(|v| v.parse().ok()) {
        return memory_probe(path, n);
    }
    assert!(path.is_file(), "{} missing: run scripts/setup.sh", path.display());
    actix::System::new().block_on(async move {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!("modelpool pool benchmark — {} on {cores} cores\n", path.file_name().unwrap().to_string_lossy());

        let shared: Arc<LlamaEngine> = LlamaEngine::load(&path).unwrap();

        // 1. pooled vs per-request
        let threads = cores.min(2) as u32;
        let pooled = pool(shared.clone(), 1, threads).await;
        let _ = per_prompt(&pooled).await; // warm-up
        let (p_ttft, p_total) = per_prompt(&pooled).await;
        pooled.shutdown().await;
        let per_req = pool(PerRequestEngine::load(&path).unwrap(), 1, threads).await;
        let (r_ttft, r_total) = per_prompt(&per_req).await;
        per_req.shutdown().await;
        println!(
            "1. Pooled vs per-request ({} prompts, 32 tokens greedy, 1 instance × {threads} threads, mean per request)",
            PROMPTS.len()
        );
        println!("   {:<14} {:>12} {:>12}", "mode", "TTFT ms", "total ms");
        println!("   {:<14} {:>12.1} {:>12.1}", "pooled", p_ttft, p_total);
        println!("   {:<14} {:>12.1} {:>12.1}", "per-request", r_ttft, r_total);
        println!("   {:<14} {:>11.1}× {:>11.1}×\n", "ratio", r_ttft / p_ttft, r_total / p_total);

        // 2. threads
        println!("2. Decode speed, 128 tokens greedy");
        println!("   {:<28} {:>12}", "layout", "tokens/s");
        for (instances, threads) in [(1usize, 1u32), (1, 2), (2, 1), (1, 4)] {
            let p = pool(shared.clone(), instances, threads).await;
            let _ = throughput(&p, instances, 8).await;
            let tps = throughput(&p, instances, 128).await;
            println!("   {:<28} {:>12.1}", format!("{instances} instance(s) × {threads} thread(s)"), tps);
            p.shutdown().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // 3. memory, each layout in a fresh process so that freed memory does not blur it
        println!("\n3. Memory (resident set size of a fresh process; n_ctx 1024, after one generation per instance)");
        println!("   weights (GGUF tensors): {:.1} MiB, memory-mapped once", mib(shared.info().weights_bytes));
        println!("   {:<12} {:>14} {:>16} {:>18}", "instances", "RSS MiB", "weights MiB", "per instance MiB");
        for n in [1usize, 4] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env("MODELPOOL_BENCH_MEMORY", n.to_string())
                .output()
                .expect("run memory probe");
            let line = String::from_utf8_lossy(&out.stdout);
            let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if let [total, weights, instances] = v[..] {
                println!("   {:<12} {:>14.1} {:>16.1} {:>18.1}", n, total, weights, instances / n as f64);
            }
        }
    });
}
