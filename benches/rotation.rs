//! Every conversation stays warm: more conversations than slots, rotating,
//! on modelpool and on llama.cpp's own `llama-server` in one run, one server
//! at a time. For N conversations, 4 clients; client c owns conversations
//! c, c+4, c+8, … and cycles through them, one turn each, for 5 rounds. Every
//! turn resends the whole history over `/v1/chat/completions` (streamed,
//! greedy, 48 tokens, `X-Conversation-Id: conv-<N>-<i>`). Then both servers
//! are restarted (SIGTERM; modelpool on the same data directory) and every
//! conversation takes a 6th turn. Then the N = 24 workload once more through
//! modelpool's `/chat` (memory on). Prints, per turn, time to first token
//! (at the client) and cached / prompt tokens, the wall time of rounds 1–5,
//! and modelpool's `/pool` `kv` and `modelpool_kv_*` metrics. Asserts nothing.
//!
//!   scripts/bench.sh --bench rotation
//!   scripts/bench.sh --bench rotation -- 24      (only N = 24; `-- 96` likewise, without /chat)
//!   scripts/bench.sh --bench rotation -- quick   (N = 8, 3 rounds: a fast check)
//!
//! `MODELPOOL_LLAMA_SERVER` names the llama-server binary (scripts/bench.sh
//! sets it; scripts/setup.sh --with-llama-server builds it).

use std::time::Instant;

use serde_json::{json, Value};

#[path = "support/client.rs"]
mod client;
#[path = "support/llama_server.rs"]
mod llama_server;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use client::{client, complete, complete_with, pct, PROMPTS};

const CLIENTS: usize = 4;
const SLOTS: u32 = 4;
const N_CTX: u32 = 2048;
const MAX_TOKENS: u32 = 48;
const SYSTEM: &str = "You are a helpful assistant.";
/// modelpool as it ships, but queueing as long as llama-server does.
const ENV: [(&str, &str); 1] = [("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000")];

/// A user message of 45–60 tokens, different for every conversation and turn.
fn message(conversation: usize, turn: usize) -> String {
    const PLACES: [&str; 6] = [
        "an old lighthouse",
        "a mountain hut",
        "a river delta",
        "a desert oasis",
        "a fishing village",
        "a pine forest",
    ];
    let place = PLACES[conversation % PLACES.len()];
    format!(
        "Conversation {conversation}, question {turn}: I am planning a long walk next spring, starting at a small \
         harbour town and ending near {place}. Which three things should I pack, and how should I plan day {turn} \
         of the walk if the weather turns windy?"
    )
}

/// One turn as measured: TTFT ms, prompt tokens, cached tokens (None: not reported).
#[derive(Clone, Copy)]
struct Turn {
    ttft_ms: f64,
    prompt: Option<u64>,
    cached: Option<u64>,
}

/// One row of a table: a turn index's figures over every conversation.
struct Row {
    ttft: [f64; 2],
    prompt: Option<f64>,
    cached: Option<f64>,
}

fn row(turns: &[Turn]) -> Row {
    let ttft: Vec<f64> = turns.iter().map(|t| t.ttft_ms).collect();
    let p50 = |v: Vec<f64>| if v.is_empty() { None } else { Some(pct(&v, 0.5)) };
    Row {
        ttft: [pct(&ttft, 0.5), pct(&ttft, 0.9)],
        prompt: p50(turns.iter().filter_map(|t| t.prompt.map(|p| p as f64)).collect()),
        cached: p50(turns.iter().filter_map(|t| t.cached.map(|c| c as f64)).collect()),
    }
}

fn tokens(r: &Row) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    format!("{}/{}", f(r.cached), f(r.prompt))
}

fn ttft(r: &Row) -> String {
    format!("{:.0}/{:.0}", r.ttft[0], r.ttft[1])
}

/// Conversations held by one client: (index, history).
type Owned = Vec<(usize, Vec<Value>)>;

/// The N conversations, split between the clients, each with its system prompt.
fn conversations(n: usize) -> Vec<Owned> {
    (0..CLIENTS)
        .map(|c| (c..n).step_by(CLIENTS).map(|i| (i, vec![json!({ "role": "system", "content": SYSTEM })])).collect())
        .collect()
}

/// Turns `turns` (1-based) of every conversation over `/v1/chat/completions`,
/// the clients at once, each cycling through its own conversations. Returns
/// the turns' figures by turn index and the wall time in seconds.
async fn rounds_v1(
    base: &str,
    n: usize,
    convs: &mut Vec<Owned>,
    turns: std::ops::RangeInclusive<usize>,
) -> (Vec<Vec<Turn>>, f64) {
    let http = client();
    let started = Instant::now();
    let runs = std::mem::take(convs).into_iter().map(|mut owned| {
        let (http, turns) = (http.clone(), turns.clone());
        async move {
            let mut out = Vec::new();
            for t in turns {
                for (i, history) in owned.iter_mut() {
                    history.push(json!({ "role": "user", "content": message(*i, t) }));
                    let header = format!("conv-{n}-{i}");
                    let s = complete_with(&http, base, history, MAX_TOKENS, &[("X-Conversation-Id", header.as_str())])
                        .await;
                    history.push(json!({ "role": "assistant", "content": s.text }));
                    let turn = Turn {
                        ttft_ms: s.ttft_ms,
                        prompt: Some(s.prompt_tokens).filter(|&p| p > 0),
                        cached: s.cache_reported.then_some(s.cached),
                    };
                    out.push((t, turn));
                }
            }
            (owned, out)
        }
    });
    let done = futures::future::join_all(runs).await;
    let wall = started.elapsed().as_secs_f64();
    let mut by_turn: Vec<Vec<Turn>> = turns.clone().map(|_| Vec::new()).collect();
    for (owned, out) in done {
        convs.push(owned);
        for (t, turn) in out {
            by_turn[t - turns.start()].push(turn);
        }
    }
    (by_turn, wall)
}

/// Turns 1..=`rounds` of `n` conversations through modelpool's `/chat`
/// (memory on, not streamed): the server's own TTFT (from the request's
/// arrival), cached and prompt tokens. Returns figures by turn, wall seconds.
async fn rounds_chat(base: &str, n: usize, rounds: usize) -> (Vec<Vec<Turn>>, f64) {
    let http = client();
    let started = Instant::now();
    let runs = (0..CLIENTS).map(|c| {
        let http = http.clone();
        async move {
            let mut ids: Vec<(usize, Option<String>)> = (c..n).step_by(CLIENTS).map(|i| (i, None)).collect();
            let mut out = Vec::new();
            for t in 1..=rounds {
                for (i, id) in ids.iter_mut() {
                    let mut body = json!({ "message": message(*i, t), "max_tokens": MAX_TOKENS, "temperature": 0 });
                    if let Some(id) = id.as_ref() {
                        body["conversation_id"] = json!(id);
                    }
                    let resp = http.post(format!("{base}/chat")).json(&body).send().await.expect("request");
                    let status = resp.status();
                    let r: Value = resp.json().await.unwrap_or(Value::Null);
                    assert!(status.is_success(), "/chat: {status}: {r}");
                    *id = r["conversation_id"].as_str().map(String::from);
                    let u = &r["usage"];
                    out.push((
                        t,
                        Turn {
                            ttft_ms: u["time_to_first_token_ms"].as_f64().unwrap_or(f64::NAN),
                            prompt: u["prompt_tokens"].as_u64(),
                            cached: u["cached_tokens"].as_u64(),
                        },
                    ));
                }
            }
            out
        }
    });
    let done = futures::future::join_all(runs).await;
    let wall = started.elapsed().as_secs_f64();
    let mut by_turn: Vec<Vec<Turn>> = (0..rounds).map(|_| Vec::new()).collect();
    for (t, turn) in done.into_iter().flatten() {
        by_turn[t - 1].push(turn);
    }
    (by_turn, wall)
}

/// One request, so that no figure pays a server's first-use costs.
async fn warm_up(base: &str) {
    complete(&client(), base, &[json!({ "role": "user", "content": PROMPTS[0] })], 8).await;
}

/// modelpool's KV figures: `/pool`'s `kv` object (`-` when absent) and the
/// `/metrics` lines that start with `modelpool_kv_`.
async fn kv_status(base: &str) -> Vec<String> {
    let http = client();
    let pool: Value = match http.get(format!("{base}/pool")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let mut out = vec![format!("/pool kv: {}", pool.get("kv").map_or("-".to_string(), Value::to_string))];
    let metrics = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let kv: Vec<String> = metrics.lines().filter(|l| l.starts_with("modelpool_kv_")).map(String::from).collect();
    if kv.is_empty() {
        out.push("/metrics modelpool_kv_*: -".to_string());
    }
    out.extend(kv.into_iter().map(|l| format!("/metrics {l}")));
    out
}

/// One server's run: rounds 1..=`rounds`, a restart, turn `rounds + 1`.
struct Run {
    rows: Vec<Row>,
    wall: f64,
    kv: Vec<(String, Vec<String>)>,
}

async fn modelpool_run(n: usize, rounds: usize) -> Run {
    let data = tempfile::tempdir().unwrap();
    let mp = server::start(1, N_CTX, data.path(), &ENV);
    warm_up(&mp.1).await;
    let mut convs = conversations(n);
    eprintln!("[rotation] modelpool: {n} conversations × {rounds} rounds");
    let (mut by_turn, wall) = rounds_v1(&mp.1, n, &mut convs, 1..=rounds).await;
    let mut kv = vec![(format!("after round {rounds}"), kv_status(&mp.1).await)];
    eprintln!("[rotation] modelpool: restart (SIGTERM), turn {}", rounds + 1);
    mp.stop();
    let mp = server::start(1, N_CTX, data.path(), &ENV);
    let (last, _) = rounds_v1(&mp.1, n, &mut convs, rounds + 1..=rounds + 1).await;
    by_turn.extend(last);
    kv.push((format!("after the restart and turn {}", rounds + 1), kv_status(&mp.1).await));
    mp.stop();
    Run { rows: by_turn.iter().map(|t| row(t)).collect(), wall, kv }
}

async fn llama_server_run(model: &str, threads: usize, n: usize, rounds: usize) -> Run {
    let (ls, base) = llama_server::start(model, SLOTS, N_CTX, threads);
    warm_up(&base).await;
    let mut convs = conversations(n);
    eprintln!("[rotation] llama-server: {n} conversations × {rounds} rounds");
    let (mut by_turn, wall) = rounds_v1(&base, n, &mut convs, 1..=rounds).await;
    eprintln!("[rotation] llama-server: restart (SIGTERM), turn {}", rounds + 1);
    ls.stop();
    let (ls, base) = llama_server::start(model, SLOTS, N_CTX, threads);
    let (last, _) = rounds_v1(&base, n, &mut convs, rounds + 1..=rounds + 1).await;
    by_turn.extend(last);
    ls.stop();
    Run { rows: by_turn.iter().map(|t| row(t)).collect(), wall, kv: Vec::new() }
}

fn print_kv(kv: &[(String, Vec<String>)]) {
    for (when, lines) in kv {
        println!("modelpool {when}:");
        for l in lines {
            println!("  {l}");
        }
    }
}

#[actix::main]
async fn main() {
    let model = std::env::var("MODELPOOL_TEST_MODEL").expect("MODELPOOL_TEST_MODEL (set by scripts/env.sh)");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    // `cargo bench` passes `--bench`: only words count.
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let (ns, rounds, chat_n): (Vec<usize>, usize, Option<usize>) =
        match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => (vec![24, 96], 5, Some(24)),
            ["quick"] => (vec![8], 3, Some(8)),
            ["24"] => (vec![24], 5, Some(24)),
            ["96"] => (vec![96], 5, None),
            _ => panic!("usage: rotation [24 | 96 | quick], got {words:?}"),
        };
    println!(
        "conversations rotating on {SLOTS} slots: modelpool vs llama-server, same model ({model}), {threads} threads each"
    );
    println!(
        "({CLIENTS} clients, each cycling through its own conversations one turn at a time; history resent each turn; \
         max_tokens {MAX_TOKENS}, temperature 0, streaming, times at the client; one server runs at a time)"
    );
    println!(
        "(modelpool: 1 instance, n_ctx {N_CTX}, default slots; llama-server: -np {SLOTS} -c {}, its defaults otherwise)",
        SLOTS * N_CTX
    );
    if let Ok(bin) = std::env::var("MODELPOOL_BENCH_BIN") {
        println!("(modelpool binary: {bin})");
    }
    println!();
    for n in ns {
        let mp = modelpool_run(n, rounds).await;
        let ls = llama_server_run(&model, threads, n, rounds).await;
        println!(
            "{n} conversations, {} per client, {rounds} rounds; then both servers restarted (SIGTERM) and turn {}",
            n / CLIENTS,
            rounds + 1
        );
        println!(
            "{:>6} {:>17} {:>15} {:>18} {:>15} {:>8}",
            "turn", "modelpool TTFT", "cached/prompt", "llama-server TTFT", "cached/prompt", "ratio"
        );
        for (t, (a, b)) in mp.rows.iter().zip(&ls.rows).enumerate() {
            let label = if t == rounds { format!("{}*", t + 1) } else { (t + 1).to_string() };
            println!(
                "{label:>6} {:>17} {:>15} {:>18} {:>15} {:>7.2}×",
                ttft(a),
                tokens(a),
                ttft(b),
                tokens(b),
                a.ttft[0] / b.ttft[0]
            );
        }
        println!(
            "(TTFT ms p50/p90; tokens p50, '-' when not reported; ratio: modelpool TTFT p50 / llama-server TTFT p50; \
             {}*: after the restart)",
            rounds + 1
        );
        println!(
            "wall time of rounds 1–{rounds}: modelpool {:.1} s, llama-server {:.1} s ({:.2}×)",
            mp.wall,
            ls.wall,
            mp.wall / ls.wall
        );
        print_kv(&mp.kv);
        println!();

        if chat_n == Some(n) {
            eprintln!("[rotation] modelpool /chat: {n} conversations × {rounds} rounds");
            let data = tempfile::tempdir().unwrap();
            let mp = server::start(1, N_CTX, data.path(), &ENV);
            warm_up(&mp.1).await;
            let (by_turn, wall) = rounds_chat(&mp.1, n, rounds).await;
            let kv = kv_status(&mp.1).await;
            mp.stop();
            println!("the same {n} conversations through modelpool's /chat (memory on, not streamed), {rounds} rounds");
            println!("{:>6} {:>17} {:>15}", "turn", "TTFT", "cached/prompt");
            for (t, turns) in by_turn.iter().enumerate() {
                let r = row(turns);
                println!("{:>6} {:>17} {:>15}", t + 1, ttft(&r), tokens(&r));
            }
            println!(
                "(TTFT ms p50/p90 as the server reports it, from the request's arrival: memory, queue and prompt; \
                 tokens p50)"
            );
            println!("wall time of rounds 1–{rounds}: {wall:.1} s");
            print_kv(&[(format!("/chat after round {rounds}"), kv)]);
            println!();
        }
    }
}
