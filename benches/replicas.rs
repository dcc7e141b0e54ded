//! The shared store and replicas, measured on the path requests take (`/chat`,
//! streaming, through HAProxy where replicas are involved):
//!
//! 1. A chat turn's store work on sled vs PostgreSQL: the `store_ms` each
//!    turn reports (every store call of the turn, timed inside it), per turn
//!    and as a share of the turn's time at the client.
//! 2. Many concurrent conversations through the shipped HAProxy config on two
//!    replicas (one PostgreSQL) vs one replica alone on the same store:
//!    aggregate turns/s, TTFT p50/p90. On one 2-core machine two replicas
//!    split the same cores (1 thread each vs 2 for the single replica), so
//!    they are not expected to be faster: this measures the cost of the
//!    set-up, its point is surviving the loss of a node.
//!
//! `BENCH_CONVERSATIONS` (default 100) and `BENCH_TURNS` (default 10) size part 2.

#[path = "support/client.rs"]
mod client;
#[path = "../tests/common/haproxy.rs"]
mod haproxy;
#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use std::time::{Duration, Instant};

use client::{client, pct};
use futures::StreamExt;
use serde_json::{json, Value};

const TOPICS: [&str; 8] = [
    "Tell me about the sea.",
    "What should I cook tonight?",
    "Explain how a bicycle works.",
    "Suggest a name for my cat.",
    "What is a prime number?",
    "Describe a walk in the mountains.",
    "Why do we need sleep?",
    "How do bees make honey?",
];

struct TurnSample {
    ttft_ms: f64,
    total_ms: f64,
    store_ms: f64,
}

/// One streaming `/chat` turn, timed at the client; returns the conversation id too.
async fn chat_turn(c: &reqwest::Client, base: &str, conv: Option<&str>, text: &str) -> (String, TurnSample) {
    let started = Instant::now();
    let mut req = c.post(format!("{base}/chat")).json(&json!({
        "message": text, "max_tokens": 16, "temperature": 0, "stream": true
    }));
    if let Some(id) = conv {
        req = req.header("X-Conversation-Id", id);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let mut stream = res.bytes_stream();
    let (mut buf, mut ttft) = (String::new(), None);
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if ttft.is_none() && buf.contains("event: token") {
            ttft = Some(started.elapsed());
        }
        if buf.contains("event: done") && buf.ends_with("\n\n") {
            break;
        }
    }
    let total = started.elapsed();
    let done = buf.split("event: done\ndata: ").nth(1).expect("a done event").lines().next().unwrap();
    let v: Value = serde_json::from_str(done).unwrap();
    let sample = TurnSample {
        ttft_ms: ttft.unwrap_or(total).as_secs_f64() * 1e3,
        total_ms: total.as_secs_f64() * 1e3,
        store_ms: v["store_ms"].as_f64().unwrap(),
    };
    (v["conversation_id"].as_str().unwrap().to_string(), sample)
}

/// `conversations` conversations at once, `turns` turns each; every sample.
async fn conversations(base: &str, conversations: usize, turns: usize) -> (Vec<TurnSample>, f64) {
    let c = client();
    let started = Instant::now();
    let runs = (0..conversations).map(|i| {
        let c = c.clone();
        async move {
            let mut id: Option<String> = None;
            let mut out = Vec::new();
            for t in 0..turns {
                let text = format!("{} (turn {t})", TOPICS[(i + t) % TOPICS.len()]);
                let (conv, s) = chat_turn(&c, base, id.as_deref(), &text).await;
                id = Some(conv);
                out.push(s);
            }
            out
        }
    });
    let samples: Vec<TurnSample> = futures::future::join_all(runs).await.into_iter().flatten().collect();
    (samples, started.elapsed().as_secs_f64())
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[actix::main]
async fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    // PostgreSQL as shipped: fsync on, like sled with durability = "sync".
    let pg = postgres::Postgres::start_durable();
    let data = tempfile::tempdir().unwrap();
    let common = [("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000"), ("MODELPOOL_MAX_QUEUE", "256")];

    // 1. Store work per turn: 4 conversations × 8 turns, one after the other.
    println!("Store work of a /chat turn (4 conversations × 8 turns, 16 tokens each, {cores} cores)");
    println!("{:<12} {:>14} {:>10} {:>10} {:>8}", "store", "store ms/turn", "p90 ms", "turn ms", "share");
    let all_cores = cores.to_string();
    let mut shares = Vec::new();
    for (name, store) in [("sled", String::new()), ("PostgreSQL", pg.create_database("store_bench"))] {
        let dir = data.path().join(name);
        let mut env = common.to_vec();
        env.push(("MODELPOOL_STORE", &store));
        env.push(("MODELPOOL_THREADS", &all_cores));
        let mp = server::start(1, 4096, &dir, &env);
        let c = client();
        let mut samples = Vec::new();
        for i in 0..4 {
            let mut id: Option<String> = None;
            for t in 0..8 {
                let (conv, s) = chat_turn(&c, &mp.1, id.as_deref(), &format!("{} ({t})", TOPICS[(i + t) % 8])).await;
                id = Some(conv);
                samples.push(s);
            }
        }
        let store: Vec<f64> = samples.iter().map(|s| s.store_ms).collect();
        let (store_mean, turn_mean) = (mean(store.iter().copied()), mean(samples.iter().map(|s| s.total_ms)));
        shares.push((name, store_mean / turn_mean * 100.0));
        println!(
            "{:<12} {:>14.2} {:>10.2} {:>10.1} {:>7.2}%",
            name,
            store_mean,
            pct(&store, 0.9),
            turn_mean,
            store_mean / turn_mean * 100.0
        );
    }

    // 2. Concurrent conversations: two replicas behind HAProxy vs one alone.
    let (n, turns) = (env_usize("BENCH_CONVERSATIONS", 100), env_usize("BENCH_TURNS", 10));
    println!("\n{n} concurrent conversations × {turns} turns (16 tokens each), one PostgreSQL store");
    println!("{:<52} {:>8} {:>9} {:>9} {:>9}", "setup", "turns/s", "TTFT p50", "TTFT p90", "store p50");
    let row = |name: &str, samples: &[TurnSample], wall: f64| {
        let ttft: Vec<f64> = samples.iter().map(|s| s.ttft_ms).collect();
        let store: Vec<f64> = samples.iter().map(|s| s.store_ms).collect();
        let rate = samples.len() as f64 / wall;
        println!("{name:<52} {rate:>8.2} {:>9.0} {:>9.0} {:>9.2}", pct(&ttft, 0.5), pct(&ttft, 0.9), pct(&store, 0.5));
        rate
    };
    let one_replica = |slots: &'static str| {
        let store = pg.create_database(&format!("one_replica_{slots}"));
        let dir = data.path().join(format!("one-{slots}"));
        let all_cores = all_cores.clone();
        async move {
            let mut env = common.to_vec();
            env.push(("MODELPOOL_STORE", &store));
            env.push(("MODELPOOL_THREADS", &all_cores));
            env.push(("MODELPOOL_SLOTS", slots));
            let mp = server::start(1, 4096, &dir, &env);
            conversations(&mp.1, n, turns).await
        }
    };
    let (samples, wall) = one_replica("4").await;
    let one = row(&format!("one replica, {cores} threads, 4 slots"), &samples, wall);
    // As many slots (and parked KV caches) as the two replicas have together.
    let (samples, wall) = one_replica("8").await;
    let one_8 = row(&format!("one replica, {cores} threads, 8 slots"), &samples, wall);
    let two = {
        let store = pg.create_database("two_replicas");
        let half = (cores / 2).max(1).to_string();
        let mut env = common.to_vec();
        env.push(("MODELPOOL_STORE", &store));
        env.push(("MODELPOOL_THREADS", &half));
        let a = server::start(1, 4096, &data.path().join("a"), &env);
        let b = server::start(1, 4096, &data.path().join("b"), &env);
        let (_proxy, base) = haproxy::start(&a.1, &b.1, data.path());
        let started = Instant::now();
        while process::http_status(base.trim_start_matches("http://"), "/health/ready", None) != Some(200) {
            assert!(started.elapsed() < Duration::from_secs(20), "the proxy does not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (samples, wall) = conversations(&base, n, turns).await;
        row(&format!("two replicas via HAProxy, {half} thread(s), 4 slots each"), &samples, wall)
    };
    println!(
        "two replicas / one: {:.2}× turns/s vs 4 slots, {:.2}× vs 8 slots (same {cores} cores)",
        two / one,
        two / one_8
    );
    for (name, share) in shares {
        println!("store share of a turn, {name}: {share:.2} % (target ≤ 5 %)");
    }
}
