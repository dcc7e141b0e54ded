//! modelpool beside llama.cpp's own `llama-server`, in one run, on the same
//! GGUF file and the same cores: the same streaming `/v1/chat/completions`
//! requests (temperature 0, usage included) to both. Prints throughput and
//! latency at several concurrencies, time to first token per turn of
//! multi-turn conversations (history resent each turn, and the same
//! conversations through modelpool's `/chat` with memory), how often
//! greedy text is the same, and tokens/s with a busy process beside the
//! server. Every table ends with modelpool / llama-server. Asserts nothing.
//!
//!   scripts/bench.sh --bench versus
//!   scripts/bench.sh --bench versus -- neighbour   (only the busy-neighbour table)
//!   scripts/bench.sh --bench versus -- turns       (only multi-turn, each server twice)
//!
//! `MODELPOOL_LLAMA_SERVER` names the llama-server binary (scripts/env.sh
//! sets it; scripts/setup.sh --with-llama-server builds it).

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

#[path = "support/client.rs"]
mod client;
#[path = "support/llama_server.rs"]
mod llama_server;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use client::{client, complete, pct, throughput, Sample, Throughput, PROMPTS};

const SLOTS: u32 = 4;
const N_CTX: u32 = 2048;
const TURNS: usize = 6;
/// Requests (one client, 128 tokens each) per figure of the neighbour table.
const NEIGHBOUR_ROUNDS: usize = 6;

/// One busy process beside the server: a shell loop that never sleeps, as a
/// build or another service on a shared machine would be. Killed on drop.
struct Neighbour(std::process::Child);

impl Neighbour {
    fn start() -> Self {
        Self(std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("start sh"))
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tokens/s of one client sending 128-token requests one after the other:
/// quiet, then with a busy neighbour. The neighbour runs 3 s before the
/// first request, for every server alike: modelpool's CPU monitor reads
/// once a second, and a neighbour on a shared machine runs for longer.
async fn beside_a_neighbour(base: &str) -> (f64, f64) {
    throughput(base, 1, 1).await;
    let quiet = throughput(base, 1, NEIGHBOUR_ROUNDS).await.tok_s;
    let _neighbour = Neighbour::start();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let busy = throughput(base, 1, NEIGHBOUR_ROUNDS).await.tok_s;
    (quiet, busy)
}

/// The busy-neighbour table: modelpool as it ships, modelpool with its
/// threads fixed (`adapt_threads = false`, as before), and llama-server.
async fn neighbour_table(model: &str, threads: usize, data: &std::path::Path) {
    let mut rows = Vec::new();
    for (name, adapt) in [("modelpool", "true"), ("modelpool adapt_threads=false", "false")] {
        eprintln!("[versus] {name}: 1 client, quiet and beside a busy process");
        let env = [("MODELPOOL_SLOTS", "4"), ("MODELPOOL_THREADS", "0"), ("MODELPOOL_ADAPT_THREADS", adapt)];
        let server = server::start(1, N_CTX, data, &env);
        rows.push((name, beside_a_neighbour(&server.1).await));
    }
    eprintln!("[versus] llama-server: 1 client, quiet and beside a busy process");
    let (_ls, base) = llama_server::start(model, SLOTS, N_CTX, threads);
    rows.push(("llama-server", beside_a_neighbour(&base).await));
    println!(
        "a busy neighbour (one `sh` busy loop beside the server), 1 client, {NEIGHBOUR_ROUNDS} × 128 tokens: tokens/s"
    );
    println!("{:>32} {:>8} {:>10} {:>8}", "server", "quiet", "neighbour", "kept");
    for (name, (quiet, busy)) in &rows {
        println!("{name:>32} {quiet:>8.1} {busy:>10.1} {:>7.2}×", busy / quiet);
    }
    let ((q, b), (fq, _), (lq, lb)) = (rows[0].1, rows[1].1, rows[2].1);
    println!(
        "(modelpool / llama-server: quiet {:.2}×, with the neighbour {:.2}×; modelpool quiet / with threads fixed: {:.2}×)",
        q / lq,
        b / lb,
        q / fq
    );
}

/// A `/chat` turn (memory on), streamed; TTFT at the client, as above.
async fn chat_turn(client: &reqwest::Client, base: &str, id: &mut Option<String>, message: &str) -> Sample {
    let mut body =
        json!({ "message": message, "max_tokens": 64, "temperature": 0, "repeat_penalty": 1.0, "stream": true });
    if let Some(id) = id.as_ref() {
        body["conversation_id"] = json!(id);
    }
    let t = Instant::now();
    let resp = client.post(format!("{base}/chat")).json(&body).send().await.expect("request");
    assert!(resp.status().is_success(), "/chat: {}", resp.status());
    let mut s = Sample::default();
    let (mut buf, mut event) = (String::new(), String::new());
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("stream")));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let line = line.trim();
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                match event.as_str() {
                    "start" => *id = v["conversation_id"].as_str().map(String::from),
                    "token" if s.text.is_empty() => {
                        s.ttft_ms = t.elapsed().as_secs_f64() * 1e3;
                        s.text.push_str(v["text"].as_str().unwrap_or_default());
                    }
                    "token" => s.text.push_str(v["text"].as_str().unwrap_or_default()),
                    "done" => {
                        s.tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        s.cached = v["usage"]["cached_tokens"].as_u64().unwrap_or(0);
                    }
                    _ => {}
                }
            }
        }
    }
    s.total_ms = t.elapsed().as_secs_f64() * 1e3;
    s
}

/// A user message of about 60 tokens.
fn message(conversation: usize, turn: usize) -> String {
    format!(
        "Conversation {conversation}, question {turn}: I am planning a long walk along the coast next spring, \
         starting at a small harbour town and ending near an old lighthouse. Which three things should I pack, \
         and how should I plan day {turn} of the walk if the weather turns windy?"
    )
}

/// TTFT p50 and cached-token p50 per turn index, `conversations` at once.
async fn multi_turn(base: &str, conversations: usize, through_chat: bool) -> Vec<(f64, f64)> {
    let client = client();
    let convs = (0..conversations).map(|c| {
        let client = client.clone();
        async move {
            let mut history: Vec<Value> = Vec::new();
            let mut id = None;
            let mut out = Vec::new();
            for t in 0..TURNS {
                let text = message(c, t);
                let s = if through_chat {
                    chat_turn(&client, base, &mut id, &text).await
                } else {
                    history.push(json!({ "role": "user", "content": text }));
                    let s = complete(&client, base, &history, 64).await;
                    history.push(json!({ "role": "assistant", "content": s.text }));
                    s
                };
                out.push(s);
            }
            out
        }
    });
    let per_conv: Vec<Vec<Sample>> = futures::future::join_all(convs).await;
    (0..TURNS)
        .map(|t| {
            let ttft: Vec<f64> = per_conv.iter().map(|c| c[t].ttft_ms).collect();
            let cached: Vec<f64> = per_conv.iter().map(|c| c[t].cached as f64).collect();
            (pct(&ttft, 0.5), pct(&cached, 0.5))
        })
        .collect()
}

/// The multi-turn table alone, each server twice in the order modelpool,
/// llama-server, llama-server, modelpool (a slow drift of the machine
/// weighs on both alike); each figure the mean of a server's two runs.
async fn turns_table(model: &str, threads: usize, data: &std::path::Path) {
    let mut runs: [Vec<Vec<(f64, f64)>>; 2] = [Vec::new(), Vec::new()];
    for target in ["modelpool", "llama-server", "llama-server", "modelpool"] {
        let (_mp, _ls, base);
        if target == "modelpool" {
            let env = [("MODELPOOL_SLOTS", "4"), ("MODELPOOL_THREADS", "0"), ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000")];
            let server = server::start(1, N_CTX, data, &env);
            base = server.1.clone();
            _mp = Some(server);
        } else {
            let server = llama_server::start(model, SLOTS, N_CTX, threads);
            base = server.1.clone();
            _ls = Some(server);
        }
        throughput(&base, 1, 1).await;
        let side = usize::from(target != "modelpool");
        for conversations in [4, 8] {
            eprintln!("[versus] {target}: {conversations} conversations × {TURNS} turns, history resent");
            let run = multi_turn(&base, conversations, false).await;
            eprintln!("[versus]   turn {TURNS} TTFT p50 {:.0} ms", run[TURNS - 1].0);
            runs[side].push(run);
        }
    }
    println!("multi-turn, history resent each turn, max_tokens 64: TTFT p50 ms, mean of two runs (cached prompt tokens p50)");
    for (k, conversations) in [4, 8].iter().enumerate() {
        println!("{conversations} conversations at once");
        println!("{:>6} {:>20} {:>20} {:>8}", "turn", "modelpool /v1", "llama-server", "ratio");
        for t in 0..TURNS {
            let mean = |side: usize| {
                let (a, b) = (runs[side][k][t], runs[side][k + 2][t]);
                ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0)
            };
            let ((a, ac), (b, bc)) = (mean(0), mean(1));
            println!("{:>6} {a:>12.0} ({ac:>5.0}) {b:>12.0} ({bc:>5.0}) {:>7.2}×", t + 1, a / b);
        }
    }
    println!("(ratio: modelpool /v1 TTFT / llama-server TTFT)");
}

/// Mean TTFT and total of 5 requests sent one after the other, 32 tokens each.
async fn five_in_a_row(base: &str) -> (f64, f64) {
    let client = client();
    let mut ttft = 0.0;
    let mut total = 0.0;
    for p in &PROMPTS[..5] {
        let s = complete(&client, base, &[json!({ "role": "user", "content": p })], 32).await;
        ttft += s.ttft_ms / 5.0;
        total += s.total_ms / 5.0;
    }
    (ttft, total)
}

fn common_prefix_chars(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

#[actix::main]
async fn main() {
    let model = std::env::var("MODELPOOL_TEST_MODEL").expect("MODELPOOL_TEST_MODEL (set by scripts/env.sh)");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let data = tempfile::tempdir().unwrap();
    println!("modelpool vs llama-server, same model ({model}), {threads} threads each, {SLOTS} slots × {N_CTX} tokens");
    println!("(one server runs at a time; temperature 0, repeat penalty off, streaming, times at the client)\n");
    if std::env::args().skip(1).any(|a| a == "neighbour") {
        return neighbour_table(&model, threads, data.path()).await;
    }
    if std::env::args().skip(1).any(|a| a == "turns") {
        return turns_table(&model, threads, data.path()).await;
    }

    let targets = ["modelpool", "llama-server"];
    let mut tp: Vec<Vec<Throughput>> = Vec::new();
    let mut turns: Vec<Vec<Vec<(f64, f64)>>> = Vec::new();
    let mut chat_turns = Vec::new();
    let levels = [(1usize, 8usize), (4, 2), (8, 1), (16, 1)];
    // The seed's comparison: 5 requests one after the other, 32 tokens each.
    let mut sequential = Vec::new();
    for target in targets {
        let mp;
        let ls;
        let base = if target == "modelpool" {
            // llama-server queues without a limit: so does modelpool here.
            let env =
                [("MODELPOOL_SLOTS", "4"), ("MODELPOOL_THREADS", "0"), ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000")];
            mp = server::start(1, N_CTX, data.path(), &env);
            mp.1.clone()
        } else {
            ls = llama_server::start(&model, SLOTS, N_CTX, threads);
            ls.1.clone()
        };
        // Warm-up: one request, so that neither side pays its first-use costs in a figure.
        throughput(&base, 1, 1).await;
        sequential.push(five_in_a_row(&base).await);
        let mut per_level = Vec::new();
        for (clients, rounds) in levels {
            eprintln!("[versus] {target}: {clients} client(s) × {rounds} request(s) of 128 tokens");
            per_level.push(throughput(&base, clients, rounds).await);
        }
        tp.push(per_level);
        let mut per_conv_count = Vec::new();
        for conversations in [4, 8] {
            eprintln!("[versus] {target}: {conversations} conversations × {TURNS} turns, history resent");
            per_conv_count.push(multi_turn(&base, conversations, false).await);
        }
        turns.push(per_conv_count);
        if target == "modelpool" {
            for conversations in [4, 8] {
                eprintln!("[versus] {target}: {conversations} conversations × {TURNS} turns through /chat");
                chat_turns.push(multi_turn(&base, conversations, true).await);
            }
        }
    }

    // The same five requests to a modelpool that loads the model for each one.
    eprintln!("[versus] modelpool --per-request: 5 requests in a row");
    let per_request = {
        let env = [("MODELPOOL_PER_REQUEST", "true"), ("MODELPOOL_THREADS", "0")];
        let server = server::start(1, N_CTX, data.path(), &env);
        five_in_a_row(&server.1).await
    };
    println!("5 requests one after the other, 32 tokens: mean time to first token / total, ms");
    println!("{:>28} {:>8.0} / {:<8.0}", "modelpool (pooled)", sequential[0].0, sequential[0].1);
    println!("{:>28} {:>8.0} / {:<8.0}", "modelpool --per-request", per_request.0, per_request.1);
    println!("{:>28} {:>8.0} / {:<8.0}", "llama-server", sequential[1].0, sequential[1].1);
    println!("(ratio pooled / llama-server TTFT: {:.2}×)\n", sequential[0].0 / sequential[1].0);

    println!("throughput, max_tokens 128 (aggregate completion tokens/s; ms at p50/p90)");
    println!(
        "{:>8} {:>13} {:>8} {:>17} {:>17} {:>8}",
        "clients", "server", "tok/s", "TTFT p50/p90", "total p50/p90", "ratio"
    );
    for (k, (clients, _)) in levels.iter().enumerate() {
        for (i, name) in targets.iter().enumerate() {
            let t = &tp[i][k];
            let ratio = if i == 0 { format!("{:.2}×", tp[0][k].tok_s / tp[1][k].tok_s) } else { String::new() };
            println!(
                "{clients:>8} {name:>13} {:>8.1} {:>8.0}/{:<8.0} {:>8.0}/{:<8.0} {ratio:>8}",
                t.tok_s, t.ttft[0], t.ttft[1], t.total[0], t.total[1]
            );
        }
    }
    println!("(ratio: modelpool tokens/s / llama-server tokens/s)\n");

    println!("multi-turn, history resent each turn, max_tokens 64: TTFT p50 ms (cached prompt tokens p50)");
    for (k, conversations) in [4, 8].iter().enumerate() {
        println!("{conversations} conversations at once");
        println!(
            "{:>6} {:>20} {:>20} {:>20} {:>8}",
            "turn", "modelpool /v1", "llama-server", "modelpool /chat", "ratio"
        );
        for t in 0..TURNS {
            let (a, ac) = turns[0][k][t];
            let (b, bc) = turns[1][k][t];
            let (c, cc) = chat_turns[k][t];
            println!(
                "{:>6} {:>12.0} ({:>5.0}) {:>12.0} ({:>5.0}) {:>12.0} ({:>5.0}) {:>7.2}×",
                t + 1,
                a,
                ac,
                b,
                bc,
                c,
                cc,
                a / b
            );
        }
    }
    println!("(ratio: modelpool /v1 TTFT / llama-server TTFT; /chat adds memory: recall, storage, a longer prompt)\n");

    let (a, b) = (&tp[0][0].texts, &tp[1][0].texts);
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    println!("greedy text, one client at a time: {same}/{} identical", a.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y) {
        println!(
            "  prompt {i}: differ after {} of {}/{} characters",
            common_prefix_chars(x, y),
            x.chars().count(),
            y.chars().count()
        );
    }
    println!();
    neighbour_table(&model, threads, data.path()).await;
}
