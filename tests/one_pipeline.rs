//! Every dialect goes through the one request pipeline: the same question
//! asked through `/chat`, `/v1/chat/completions` and `/api/chat` with the
//! same sampling (each in its own dialect's words) becomes the same
//! prepared request — the same sampling parameters, the same prompt tokens —
//! and its prompt is tokenized once per request. The server says what each
//! request became in its `modelpool::prepared` log line, and each whole
//! prompt it tokenizes in a `modelpool::tokenized` line.

mod common;

use std::time::{Duration, Instant};

use common::http::post;
use common::server::Server;
use serde_json::{json, Value};

const SYSTEM: &str = "You are a terse assistant.";
const QUESTION: &str = "Name three colours of the rainbow.";

/// The fields of a `request prepared` line, and the `prompt tokenized`
/// lines logged since `from`, once the request's line is there.
async fn prepared_since(server: &Server, from: usize) -> (Value, u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = server.log.lock().unwrap()[from..].to_vec();
        let prepared: Vec<&String> = lines.iter().filter(|l| l.contains("request prepared")).collect();
        if let [line] = prepared.as_slice() {
            let sampling = line.split("sampling=").nth(1).expect("a sampling field").trim();
            let sampling: Value = serde_json::from_str(sampling).unwrap_or_else(|e| panic!("{e}: {line}"));
            let tokens: u64 = line
                .split("prompt_tokens=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no prompt_tokens in {line}"));
            let tokenized = lines.iter().filter(|l| l.contains("prompt tokenized")).count();
            return (sampling, tokens, tokenized);
        }
        assert!(prepared.len() <= 1, "one request was prepared {} times:\n{}", prepared.len(), lines.join("\n"));
        assert!(Instant::now() < deadline, "no `request prepared` line within 10 s:\n{}", lines.join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn the_same_question_through_chat_openai_and_ollama_is_the_same_prepared_request() {
    let server = Server::start(
        &["--instances", "1"],
        &[
            ("MODELPOOL_SYSTEM_PROMPT", SYSTEM),
            ("MODELPOOL_LOG", "warn,modelpool::prepared=debug,modelpool::tokenized=debug"),
        ],
    );
    let sampling = json!({
        "temperature": 0.0, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": 7,
        "repeat_penalty": 1.1, "repeat_last_n": 32, "frequency_penalty": 0.1,
        "presence_penalty": 0.2, "stop": ["\n\n"],
    });
    let merged = |mut body: Value, extra: &Value| {
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let messages = json!([{ "role": "system", "content": SYSTEM }, { "role": "user", "content": QUESTION }]);
    let mut options = sampling.clone();
    options["num_predict"] = json!(12);
    let asks = [
        ("/chat", merged(json!({ "message": QUESTION, "max_tokens": 12 }), &sampling)),
        ("/v1/chat/completions", merged(json!({ "messages": messages, "max_tokens": 12 }), &sampling)),
        ("/api/chat", json!({ "messages": messages, "stream": false, "options": options })),
    ];

    let mut seen = Vec::new();
    for (path, body) in asks {
        let from = server.log.lock().unwrap().len();
        let (status, answer) = post(&server, path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let (prepared, tokens, tokenized) = prepared_since(&server, from).await;
        // What the answer reports as its prompt is what was prepared.
        let reported = match path {
            "/api/chat" => &answer["prompt_eval_count"],
            _ => &answer["usage"]["prompt_tokens"],
        };
        assert_eq!(reported.as_u64(), Some(tokens), "{path}: {answer}");
        assert_eq!(tokenized, 1, "{path}: the prompt was tokenized {tokenized} times, not once");
        seen.push((path, prepared, tokens));
    }
    let (first, sampling, tokens) = &seen[0];
    assert_eq!(sampling["max_tokens"], 12, "{sampling}");
    assert_eq!(sampling["top_k"], 5, "{sampling}");
    assert_eq!(sampling["stop"], json!(["\n\n"]), "{sampling}");
    for (path, other, other_tokens) in &seen[1..] {
        assert_eq!(other, sampling, "{path} and {first} prepared different sampling");
        assert_eq!(other_tokens, tokens, "{path} and {first} prepared prompts of different lengths");
    }
}
