//! The benchmarks' HTTP client side: one streaming chat completion timed at
//! the client, percentiles, and a throughput run of concurrent clients.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

/// Prompts of the throughput runs.
pub const PROMPTS: [&str; 16] = [
    "Write a short poem about the sea.",
    "Explain what a compiler does.",
    "List three fruits and their colours.",
    "Describe a walk in the mountains.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for pancakes.",
    "How do bees make honey?",
    "Tell me a story about a brave mouse.",
    "What are the planets of the solar system?",
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "How does a bicycle stay upright?",
    "Describe the water cycle.",
    "What is a prime number? Give examples.",
    "Suggest three names for a cat.",
    "Why do we need sleep?",
];

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub ttft_ms: f64,
    pub total_ms: f64,
    pub tokens: u64,
    /// Cached prompt tokens; 0 when the server reports none (see `cache_reported`).
    pub cached: u64,
    /// Whether the server said how many prompt tokens its cache held.
    pub cache_reported: bool,
    pub prompt_tokens: u64,
    pub text: String,
}

/// The id a server gives its model (`/v1/models`).
pub async fn model_id(base: &str) -> String {
    let v: Value = client().get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    v["data"][0]["id"].as_str().expect("a model id").to_string()
}

/// One streaming chat completion; times are measured here, at the client.
pub async fn complete(client: &reqwest::Client, base: &str, messages: &[Value], max_tokens: u32) -> Sample {
    complete_with(client, base, messages, max_tokens, &[]).await
}

/// `complete` with extra request headers (e.g. `X-Conversation-Id`).
pub async fn complete_with(
    client: &reqwest::Client,
    base: &str,
    messages: &[Value],
    max_tokens: u32,
    headers: &[(&str, &str)],
) -> Sample {
    complete_body(client, base, messages, max_tokens, headers, &Value::Null).await
}

/// `complete_with` plus the fields of `extra` (an object) in the body, e.g.
/// `response_format`.
pub async fn complete_body(
    client: &reqwest::Client,
    base: &str,
    messages: &[Value],
    max_tokens: u32,
    headers: &[(&str, &str)],
    extra: &Value,
) -> Sample {
    static MODEL: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let known = MODEL.lock().unwrap().iter().find(|(b, _)| b == base).map(|(_, m)| m.clone());
    let model = match known {
        Some(m) => m,
        None => {
            let m = model_id(base).await;
            MODEL.lock().unwrap().push((base.to_string(), m.clone()));
            m
        }
    };
    let body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let mut body = body;
    if let Some(fields) = extra.as_object() {
        for (k, v) in fields {
            body[k] = v.clone();
        }
    }
    let mut req = client.post(format!("{base}/v1/chat/completions")).json(&body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let t = Instant::now();
    let resp = req.send().await.expect("request");
    let status = resp.status();
    assert!(status.is_success(), "{base}: {status}: {}", resp.text().await.unwrap_or_default());
    let mut s = Sample::default();
    let mut deltas = 0u64;
    // llama-server without `prompt_tokens_details` in its usage: its own
    // `timings.cache_n`, from whichever chunk carries it.
    let mut cache_n = None;
    let mut buf = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("stream")));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            cache_n = v["timings"]["cache_n"].as_u64().or(cache_n);
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                if !piece.is_empty() {
                    if s.text.is_empty() {
                        s.ttft_ms = t.elapsed().as_secs_f64() * 1e3;
                    }
                    deltas += 1;
                    s.text.push_str(piece);
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                s.tokens = n;
                s.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                if let Some(c) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    s.cached = c;
                    s.cache_reported = true;
                }
            }
        }
    }
    if let (false, Some(c)) = (s.cache_reported, cache_n) {
        s.cached = c;
        s.cache_reported = true;
    }
    if s.tokens == 0 {
        s.tokens = deltas;
    }
    s.total_ms = t.elapsed().as_secs_f64() * 1e3;
    s
}

/// A client without idle connections: llama-server closes kept-alive
/// connections between requests, which a pooled client would then reuse.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(600)).pool_max_idle_per_host(0).build().unwrap()
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub struct Throughput {
    pub tok_s: f64,
    pub ttft: [f64; 2],
    pub total: [f64; 2],
    pub texts: Vec<String>,
}

/// `clients` clients, each sending `rounds` requests one after the other.
pub async fn throughput(base: &str, clients: usize, rounds: usize) -> Throughput {
    let client = client();
    let t = Instant::now();
    let runs = (0..clients).map(|c| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            for r in 0..rounds {
                let prompt = PROMPTS[(c * rounds + r) % PROMPTS.len()];
                out.push(complete(&client, base, &[json!({ "role": "user", "content": prompt })], 128).await);
            }
            out
        }
    });
    let samples: Vec<Sample> = futures::future::join_all(runs).await.into_iter().flatten().collect();
    let wall = t.elapsed().as_secs_f64();
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft_ms).collect();
    let total: Vec<f64> = samples.iter().map(|s| s.total_ms).collect();
    Throughput {
        tok_s: samples.iter().map(|s| s.tokens).sum::<u64>() as f64 / wall,
        ttft: [pct(&ttft, 0.5), pct(&ttft, 0.9)],
        total: [pct(&total, 0.5), pct(&total, 0.9)],
        texts: samples.into_iter().map(|s| s.text).collect(),
    }
}
