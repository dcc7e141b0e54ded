//! The ceiling and what the service costs on top of it. The bare loop: one
//! instance's backend (the batcher over its context, as its model actor
//! runs it) driven directly by this thread, no HTTP, no pool, no
//! actor: 1, 4 and 8 clients, each sending 4 requests of 128 greedy tokens
//! one after the other. Then the same workload through
//! `/v1/chat/completions` (streaming) on a real `modelpool serve` with the
//! same instance settings (8 slots, 2 threads, threads fixed). Prints
//! aggregate tokens/s of both and the ratio. Asserts nothing.
//!
//!   scripts/bench.sh --bench bare

use std::time::{Duration, Instant};

use modelpool_actors::engine::{CacheKey, Engine, InstanceOptions, SeqEvent, SeqSink};
use modelpool_actors::{ChatMessage, GenerateRequest, LlamaEngine, SamplingParams};
use serde_json::json;

#[path = "support/client.rs"]
mod client;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

const SLOTS: u32 = 8;
const N_CTX: u32 = 2048;
const THREADS: u32 = 2;
const MAX_TOKENS: u32 = 128;
const ROUNDS: usize = 4;

fn model() -> String {
    std::env::var("MODELPOOL_TEST_MODEL").expect("MODELPOOL_TEST_MODEL (scripts/bench.sh sets it)")
}

/// `n` clients on the backend alone, each sending `ROUNDS` requests one after
/// the other in its own slot (as the served clients do): tokens/s.
fn bare(engine: &LlamaEngine, n: usize) -> f64 {
    let opts = InstanceOptions { slots: SLOTS, adapt_threads: false, ..InstanceOptions::single(N_CTX, THREADS) };
    let mut backend = engine.create_instance(0, &opts).expect("an instance");
    // Client `i`'s request of `round`, started in slot `i`: checked and
    // tokenized as the pool does for every request, with the prompt the
    // served client sends.
    let start = |backend: &mut Box<dyn modelpool_actors::engine::InstanceBackend>, i: usize, round: usize| {
        let prompt = client::PROMPTS[(round * n + i) % client::PROMPTS.len()];
        let request = GenerateRequest {
            messages: vec![ChatMessage::user(prompt)],
            // As the served requests ask (repeat penalty off).
            sampling: SamplingParams { repeat_penalty: 1.0, ..SamplingParams::greedy(MAX_TOKENS) },
            ..Default::default()
        };
        let request = engine.prepare(request, N_CTX).expect("a valid request");
        let (sink, events) = SeqSink::channel();
        let key = CacheKey::new("bench", format!("{round}-{i}").as_bytes());
        backend.start(i, request, key, Instant::now(), sink);
        events
    };
    // Runs every client's `rounds`; the tokens generated.
    let run = |backend: &mut Box<dyn modelpool_actors::engine::InstanceBackend>, rounds: std::ops::Range<usize>| {
        let mut clients: Vec<(usize, _)> = (0..n).map(|i| (rounds.start, start(backend, i, rounds.start))).collect();
        let (mut tokens, mut running) = (0u64, n);
        while running > 0 {
            backend.step().expect("a step");
            // Each client reads what the step produced, and sends its next request once one ends.
            for (i, (round, events)) in clients.iter_mut().enumerate() {
                while let Ok(event) = events.try_recv() {
                    if let SeqEvent::Done(result) = event {
                        tokens += result.expect("a completion").usage.completion_tokens as u64;
                        *round += 1;
                        if *round < rounds.end {
                            *events = start(backend, i, *round);
                        } else {
                            running -= 1;
                        }
                        break;
                    }
                }
            }
        }
        tokens
    };
    // One round first, untimed, as the server's warm-up request: a fresh
    // context sizes its buffers at its first decodes.
    run(&mut backend, 0..1);
    let started = Instant::now();
    let tokens = run(&mut backend, 0..ROUNDS);
    tokens as f64 / started.elapsed().as_secs_f64()
}

/// The same through `/v1/chat/completions`: `n` clients, `ROUNDS` requests each.
async fn served(base: &str, n: usize) -> f64 {
    let http = client::client();
    let started = Instant::now();
    let runs = (0..n).map(|i| {
        let http = http.clone();
        async move {
            let mut tokens = 0;
            for round in 0..ROUNDS {
                let prompt = client::PROMPTS[(round * n + i) % client::PROMPTS.len()];
                let messages = [json!({ "role": "user", "content": prompt })];
                tokens += client::complete(&http, base, &messages, MAX_TOKENS).await.tokens;
            }
            tokens
        }
    });
    let tokens: u64 = futures::future::join_all(runs).await.into_iter().sum();
    tokens as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let engine = LlamaEngine::load(model()).expect("the model (scripts/setup.sh)");
    println!(
        "The bare loop and the service: {SLOTS} slots, {THREADS} threads (fixed), {MAX_TOKENS} greedy tokens, \
         {ROUNDS} rounds; aggregate completion tokens/s (each the mean of two runs)"
    );
    println!("   {:>9} {:>12} {:>14} {:>8}", "sequences", "bare loop", "/v1 streaming", "ratio");
    let rt = actix::System::new();
    rt.block_on(async {
        let data = tempfile::tempdir().unwrap();
        let env = [
            ("MODELPOOL_SLOTS", "8"),
            ("MODELPOOL_THREADS", "2"),
            ("MODELPOOL_ADAPT_THREADS", "false"),
            ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000"),
        ];
        let srv = server::start(1, N_CTX, data.path(), &env);
        let base = srv.1.clone();
        served(&base, 1).await; // warm-up
                                // Side by side at each count, in the order bare, served, served,
                                // bare (the mean of each pair), so that the machine's drift hits both alike.
        for n in [1usize, 4, 8] {
            let first = bare(&engine, n);
            let v1 = (served(&base, n).await + served(&base, n).await) / 2.0;
            let bare = (first + bare(&engine, n)) / 2.0;
            println!("   {n:>9} {bare:>12.1} {v1:>14.1} {:>7.3}×", v1 / bare);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        srv.stop();
    });
    println!("(ratio: /v1 tokens/s / bare-loop tokens/s; the service's cost on top of the loop)");
}
