//! Remote instances: the same 8-client streaming workload against
//! (a) modelpool with one local instance, (b) modelpool in front of one
//! llama-server (no local instance), (c) modelpool with a local instance and
//! a llama-server on the same cores, and llama-server called directly. The
//! direct and the (b) runs alternate on the same llama-server process, twice
//! each, so that the overhead of going through modelpool is measured in one
//! run on the same machine state. Prints tokens/s, TTFT p50/p90 and the
//! overhead; asserts nothing.
//!
//!   scripts/bench.sh --bench remote

use serde_json::Value;

#[path = "support/client.rs"]
mod client;
#[path = "support/llama_server.rs"]
mod llama_server;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use client::{throughput, Throughput};

const CLIENTS: usize = 8;
const ROUNDS: usize = 2;
const SLOTS: u32 = 4;
const N_CTX: u32 = 2048;

fn row(name: &str, t: &Throughput) {
    println!(
        "{name:<34} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
        t.tok_s, t.ttft[0], t.ttft[1], t.total[0], t.total[1]
    );
}

fn mean(runs: &[Throughput]) -> Throughput {
    let n = runs.len() as f64;
    let avg = |f: &dyn Fn(&Throughput) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Throughput {
        tok_s: avg(&|t| t.tok_s),
        ttft: [avg(&|t| t.ttft[0]), avg(&|t| t.ttft[1])],
        total: [avg(&|t| t.total[0]), avg(&|t| t.total[1])],
        texts: Vec::new(),
    }
}

/// How many requests each member of a modelpool served.
async fn served(base: &str) -> String {
    let p: Value = reqwest::get(format!("{base}/pool")).await.unwrap().json().await.unwrap();
    let per: Vec<String> = p["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{} {}", i["kind"].as_str().unwrap_or("?"), i["requests"]))
        .collect();
    per.join(", ")
}

#[actix::main]
async fn main() {
    let model = std::env::var("MODELPOOL_TEST_MODEL").expect("MODELPOOL_TEST_MODEL (set by scripts/env.sh)");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let half = (cores / 2).max(1);
    println!(
        "Remote instances: {CLIENTS} clients × {ROUNDS} streaming requests of 128 tokens, temperature 0, {cores} cores"
    );
    println!("llama-server: -np {SLOTS} -c {} -nr; modelpool: {SLOTS} slots per local instance\n", SLOTS * N_CTX);
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "setup", "tok/s", "TTFT p50", "TTFT p90", "total p50", "total p90"
    );

    let data = tempfile::tempdir().unwrap();
    let slots = SLOTS.to_string();
    let all_cores = cores.to_string();

    // (a) one local instance on every core.
    let local = {
        let mp = server::start(
            1,
            N_CTX,
            data.path(),
            &[
                ("MODELPOOL_SLOTS", &slots),
                ("MODELPOOL_THREADS", &all_cores),
                ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000"),
            ],
        );
        let t = throughput(&mp.1, CLIENTS, ROUNDS).await;
        row(&format!("(a) modelpool, local 1×{SLOTS}×{cores}"), &t);
        t
    };

    // (b) and direct, alternating on one llama-server.
    let (direct, via) = {
        let (_ls, url) = llama_server::start(&model, SLOTS, N_CTX, cores);
        let data = tempfile::tempdir().unwrap();
        let mp = server::start(
            0,
            N_CTX,
            data.path(),
            &[("MODELPOOL_REMOTES", &url), ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000")],
        );
        // One client first, no queue anywhere. New prompts: modelpool pins
        // each to the slot it leased (the coldest), llama-server alone picks
        // the slot whose cache is most similar, so the prompt work differs.
        // Then one prompt again and again (fully cached both ways): the hop
        // through modelpool itself.
        let (mut direct1, mut via1) = (Vec::new(), Vec::new());
        let (mut direct_hop, mut via_hop) = (Vec::new(), Vec::new());
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            direct1.push(throughput(&url, 1, 4).await);
            via1.push(throughput(&mp.1, 1, 4).await);
        }
        let c = client::client();
        let same = [serde_json::json!({ "role": "user", "content": client::PROMPTS[0] })];
        for base in [&url, &mp.1] {
            client::complete(&c, base, &same, 32).await;
        }
        for _ in 0..4 {
            direct_hop.push(client::complete(&c, &url, &same, 32).await);
            via_hop.push(client::complete(&c, &mp.1, &same, 32).await);
        }
        for _ in 0..2 {
            direct.push(throughput(&url, CLIENTS, ROUNDS).await);
            via.push(throughput(&mp.1, CLIENTS, ROUNDS).await);
        }
        let (direct1, via1) = (mean(&direct1), mean(&via1));
        let (direct, via) = (mean(&direct), mean(&via));
        row("llama-server directly, 1 client", &direct1);
        row("(b) modelpool → it, 1 client", &via1);
        row("llama-server, called directly", &direct);
        row("(b) modelpool → that llama-server", &via);
        println!(
            "overhead, 1 client, new prompts: tokens/s {:.3}× ({:+.1} %), TTFT p50 {:+.1} ms",
            via1.tok_s / direct1.tok_s,
            (via1.tok_s / direct1.tok_s - 1.0) * 100.0,
            via1.ttft[0] - direct1.ttft[0]
        );
        let p50 = |v: &[client::Sample], f: &dyn Fn(&client::Sample) -> f64| {
            client::pct(&v.iter().map(f).collect::<Vec<_>>(), 0.5)
        };
        let rate = |s: &client::Sample| s.tokens as f64 / (s.total_ms / 1e3);
        println!(
            "overhead, 1 client, one prompt fully cached (the hop itself): TTFT p50 {:.1} vs {:.1} ms ({:+.1} ms), \
             tokens/s {:.1} vs {:.1} ({:.3}×)",
            p50(&via_hop, &|s| s.ttft_ms),
            p50(&direct_hop, &|s| s.ttft_ms),
            p50(&via_hop, &|s| s.ttft_ms) - p50(&direct_hop, &|s| s.ttft_ms),
            p50(&via_hop, &rate),
            p50(&direct_hop, &rate),
            p50(&via_hop, &rate) / p50(&direct_hop, &rate),
        );
        (direct, via)
    };

    // (c) a local instance and a llama-server, half the cores each.
    let mixed = {
        let (_ls, url) = llama_server::start(&model, SLOTS, N_CTX, half);
        let data = tempfile::tempdir().unwrap();
        let mp = server::start(
            1,
            N_CTX,
            data.path(),
            &[
                ("MODELPOOL_SLOTS", &slots),
                ("MODELPOOL_THREADS", &half.to_string()),
                ("MODELPOOL_REMOTES", &url),
                ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000"),
            ],
        );
        let t = throughput(&mp.1, CLIENTS, ROUNDS).await;
        row(&format!("(c) local 1×{SLOTS}×{half} + remote -t {half}"), &t);
        println!("{:<34} served: {}", "", served(&mp.1).await);
        t
    };

    println!();
    println!(
        "overhead, {CLIENTS} clients: tokens/s {:.3}× ({:+.1} %), TTFT p50 {:+.0} ms, p90 {:+.0} ms",
        via.tok_s / direct.tok_s,
        (via.tok_s / direct.tok_s - 1.0) * 100.0,
        via.ttft[0] - direct.ttft[0],
        via.ttft[1] - direct.ttft[1]
    );
    println!(
        "tokens/s relative to (a) local: (b) remote {:.2}×, (c) local + remote {:.2}×",
        via.tok_s / local.tok_s,
        mixed.tok_s / local.tok_s
    );
}
