//! Load benchmark: a real `modelpool serve` process per pool size, driven by
//! concurrent HTTP clients on /v1/chat/completions. Prints completed
//! requests/s, generated tokens/s and latency percentiles of completed
//! requests; failed requests (any non-200 answer or transport error) are
//! counted apart, never as completions. Asserts nothing.
//!
//!   cargo bench --bench load            (scripts/bench.sh does the set-up first)

use std::time::Instant;

use serde_json::{json, Value};

#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;
use server::start;

const MAX_TOKENS: u32 = 32;
/// Requests each client sends, one after another.
const PER_CLIENT: usize = 4;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One load run: completed req/s, tokens/s, p50/p90/p99 of completed requests, and errors.
struct RunResult {
    rps: f64,
    tps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    errors: usize,
}

/// One request: `Ok((latency ms, completion tokens))` for a 200, `Err(status or transport error)` else.
async fn one(client: &reqwest::Client, url: &str, body: &Value) -> Result<(f64, u64), String> {
    let t = Instant::now();
    let res = client.post(url).json(body).send().await.map_err(|e| e.to_string())?;
    let status = res.status();
    if !status.is_success() {
        return Err(status.to_string());
    }
    let r: Value = res.json().await.map_err(|e| e.to_string())?;
    let tokens = r["usage"]["completion_tokens"].as_u64().ok_or("no usage in the answer")?;
    Ok((t.elapsed().as_secs_f64() * 1e3, tokens))
}

async fn run(base: &str, concurrency: usize) -> RunResult {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let workers = (0..concurrency).map(|w| {
        let (client, url) = (client.clone(), format!("{base}/v1/chat/completions"));
        async move {
            let mut out = Vec::new();
            for i in 0..PER_CLIENT {
                let body = json!({
                    "messages": [{ "role": "user", "content": format!("Tell me fact number {} about the sea.", w * PER_CLIENT + i) }],
                    "max_tokens": MAX_TOKENS, "temperature": 0,
                });
                out.push(one(&client, &url, &body).await);
            }
            out
        }
    });
    let all: Vec<Result<(f64, u64), String>> = futures::future::join_all(workers).await.into_iter().flatten().collect();
    let wall = started.elapsed().as_secs_f64();
    let (done, failed): (Vec<_>, Vec<_>) = all.into_iter().partition(Result::is_ok);
    let done: Vec<(f64, u64)> = done.into_iter().map(Result::unwrap).collect();
    for e in failed.iter().take(3) {
        eprintln!("  failed request: {}", e.as_ref().unwrap_err());
    }
    let mut lat: Vec<f64> = done.iter().map(|r| r.0).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = done.iter().map(|r| r.1).sum();
    let pct = |p| if lat.is_empty() { f64::NAN } else { percentile(&lat, p) };
    RunResult {
        rps: done.len() as f64 / wall,
        tps: tokens as f64 / wall,
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
        errors: failed.len(),
    }
}

fn main() {
    actix::System::new().block_on(async {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!("Load on /v1/chat/completions: {MAX_TOKENS} tokens greedy per request, {PER_CLIENT} requests per client, {cores} cores");
        println!("threads per instance = max(1, cores / instances)\n");
        println!(
            "{:>9} {:>11} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7}",
            "instances", "concurrency", "req/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "errors"
        );
        for instances in [1usize, 2, 4] {
            let data = tempfile::tempdir().unwrap();
            let server = start(instances, 1024, data.path(), &[]);
            let _ = run(&server.1, 1).await; // warm-up
            for concurrency in [1usize, 4, 8] {
                let RunResult { rps, tps, p50, p90, p99, errors } = run(&server.1, concurrency).await;
                println!(
                    "{instances:>9} {concurrency:>11} {rps:>9.2} {tps:>10.1} {p50:>10.0} {p90:>10.0} {p99:>10.0} {errors:>7}"
                );
            }
            drop(server);
        }
    });
}
