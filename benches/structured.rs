//! Structured output beside llama.cpp's own `llama-server`, in one run, on
//! the same GGUF file and cores: tokens/s of streaming
//! `/v1/chat/completions` (greedy, up to 128 tokens) with a JSON schema
//! (`response_format` `json_schema`: nested objects, an enum, an array) and
//! without, at 1 and 4 clients, through the path every request takes. Every
//! row ends with modelpool / llama-server. Asserts nothing.
//!
//!   scripts/bench.sh --bench structured

use serde_json::{json, Value};

#[path = "support/client.rs"]
mod client;
#[path = "support/llama_server.rs"]
mod llama_server;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use client::{client, complete_body, PROMPTS};

const SLOTS: u32 = 4;
const N_CTX: u32 = 2048;
const ROUNDS: usize = 4;
const MAX_TOKENS: u32 = 128;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": { "type": "string", "maxLength": 40 },
            "mood": { "type": "string", "enum": ["happy", "sad", "calm", "tense"] },
            "place": {
                "type": "object",
                "properties": { "city": { "type": "string", "maxLength": 24 }, "country": { "type": "string", "maxLength": 24 } },
                "required": ["city", "country"],
                "additionalProperties": false
            },
            "events": { "type": "array", "items": { "type": "string", "maxLength": 60 }, "minItems": 3, "maxItems": 8 }
        },
        "required": ["title", "mood", "place", "events"],
        "additionalProperties": false
    })
}

/// Aggregate tokens/s and how many replies were complete JSON, `clients`
/// clients each sending `ROUNDS` requests one after the other.
async fn run(base: &str, clients: usize, extra: &Value) -> (f64, usize, usize) {
    let http = client();
    let t = std::time::Instant::now();
    let runs = (0..clients).map(|c| {
        let http = http.clone();
        async move {
            let mut out = Vec::new();
            for r in 0..ROUNDS {
                let prompt = format!("Tell a short story as JSON. {}", PROMPTS[(c * ROUNDS + r) % PROMPTS.len()]);
                let messages = [json!({ "role": "user", "content": prompt })];
                out.push(complete_body(&http, base, &messages, MAX_TOKENS, &[], extra).await);
            }
            out
        }
    });
    let samples: Vec<_> = futures::future::join_all(runs).await.into_iter().flatten().collect();
    let wall = t.elapsed().as_secs_f64();
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    let parsed = samples.iter().filter(|s| serde_json::from_str::<Value>(&s.text).is_ok()).count();
    (tokens as f64 / wall, parsed, samples.len())
}

#[actix::main]
async fn main() {
    let model = std::env::var("MODELPOOL_TEST_MODEL").expect("MODELPOOL_TEST_MODEL (set by scripts/env.sh)");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let constrained = json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "story", "schema": schema(), "strict": true } } });
    let free = Value::Null;
    let mut table: Vec<(&str, usize, [(f64, usize, usize); 2])> = Vec::new();
    let data = tempfile::tempdir().unwrap();
    {
        eprintln!("[structured] modelpool: 1 instance × {SLOTS} slots");
        let env = [("MODELPOOL_SLOTS", "4"), ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000")];
        let mp = server::start(1, N_CTX, data.path(), &env);
        run(&mp.1, 1, &free).await; // warm-up
        for clients in [1, 4] {
            let f = run(&mp.1, clients, &free).await;
            let c = run(&mp.1, clients, &constrained).await;
            table.push(("modelpool", clients, [f, c]));
        }
        mp.stop();
    }
    {
        eprintln!("[structured] llama-server: -np {SLOTS}");
        let (ls, base) = llama_server::start(&model, SLOTS, N_CTX, threads);
        run(&base, 1, &free).await;
        for clients in [1, 4] {
            let f = run(&base, clients, &free).await;
            let c = run(&base, clients, &constrained).await;
            table.push(("llama-server", clients, [f, c]));
        }
        ls.stop();
    }
    println!("structured output: streaming /v1/chat/completions, greedy, up to {MAX_TOKENS} tokens, {ROUNDS} requests per client");
    println!(
        "{:>13} {:>8} {:>12} {:>16} {:>12} {:>12}",
        "server", "clients", "free tok/s", "schema tok/s", "schema/free", "valid JSON"
    );
    for (name, clients, [(f, _, _), (c, ok, n)]) in &table {
        println!("{name:>13} {clients:>8} {f:>12.1} {c:>16.1} {:>11.2}× {ok:>9}/{n}", c / f);
    }
    for clients in [1, 4] {
        let find = |name| table.iter().find(|(n, c, _)| *n == name && *c == clients).map(|(_, _, r)| *r);
        if let (Some(mp), Some(ls)) = (find("modelpool"), find("llama-server")) {
            println!(
                "({clients} client(s), modelpool / llama-server: free {:.2}×, with the schema {:.2}×)",
                mp[0].0 / ls[0].0,
                mp[1].0 / ls[1].0
            );
        }
    }
}
