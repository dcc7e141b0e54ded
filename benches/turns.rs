//! Multi-turn benchmark: conversations through /chat (memory on), several at
//! once, on a real server. Prints, per turn index, the time to first token
//! (from the request's arrival: memory, queue and prompt included), the
//! prompt size and how much of it each instance's KV cache already held.
//! Asserts nothing.
//!
//!   scripts/bench.sh --bench turns

use std::time::Duration;

use serde_json::{json, Value};

#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;
use server::start;

const TURNS: usize = 6;
const MAX_TOKENS: u32 = 48;

/// A user message of about 60 tokens.
fn message(conversation: usize, turn: usize) -> String {
    format!(
        "Conversation {conversation}, question {turn}: I am planning a long walk along the coast next spring, \
         starting at a small harbour town and ending near an old lighthouse. Which three things should I pack, \
         and how should I plan day {turn} of the walk if the weather turns windy?"
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run(base: &str, conversations: usize) -> Vec<(f64, f64, f64)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
    let convs = (0..conversations).map(|c| {
        let (client, url) = (client.clone(), format!("{base}/chat"));
        async move {
            let mut id: Option<String> = None;
            let mut out = Vec::new();
            for t in 0..TURNS {
                let mut body = json!({ "message": message(c, t), "max_tokens": MAX_TOKENS, "temperature": 0 });
                if let Some(id) = &id {
                    body["conversation_id"] = json!(id);
                }
                let r: Value = client.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
                let u = &r["usage"];
                id = r["conversation_id"].as_str().map(String::from);
                out.push((
                    u["time_to_first_token_ms"].as_f64().unwrap_or(f64::NAN),
                    u["prompt_tokens"].as_f64().unwrap_or(f64::NAN),
                    u["cached_tokens"].as_f64().unwrap_or(f64::NAN),
                ));
            }
            out
        }
    });
    let per_conv: Vec<Vec<(f64, f64, f64)>> = futures::future::join_all(convs).await;
    (0..TURNS)
        .map(|t| {
            let col = |f: fn(&(f64, f64, f64)) -> f64| median(per_conv.iter().map(|c| f(&c[t])).collect());
            (col(|x| x.0), col(|x| x.1), col(|x| x.2))
        })
        .collect()
}

fn main() {
    actix::System::new().block_on(async {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!(
            "Conversations through /chat: {TURNS} turns, ~60-token messages, {MAX_TOKENS} tokens greedy, n_ctx 2048, {cores} cores"
        );
        for (instances, conversations) in [(1usize, 1usize), (2, 2), (2, 4)] {
            let data = tempfile::tempdir().unwrap();
            let server = start(instances, 2048, data.path(), &[]);
            let rows = run(&server.1, conversations).await;
            println!("\n{instances} instance(s), {conversations} conversation(s) at once (medians)");
            println!("   {:>4} {:>10} {:>14} {:>14}", "turn", "TTFT ms", "prompt tokens", "cached tokens");
            for (t, (ttft, prompt, cached)) in rows.iter().enumerate() {
                println!("   {:>4} {ttft:>10.0} {prompt:>14.0} {cached:>14.0}", t + 1);
            }
            drop(server);
        }
    });
}
