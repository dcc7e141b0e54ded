//! The HTTP API end to end: a real server process on an ephemeral port, real
//! clients (async-openai, reqwest), the real models.

mod common;

use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use async_openai::Client;
use common::http::{expect_error, http, metrics, pool, request, wait_pool};
use common::process::signal;
use common::server::{sse_events, Server};
use futures::StreamExt;
use serde_json::{json, Value};

#[actix::test]
async fn an_unmodified_openai_client_chats_streams_and_embeds() {
    let server = Server::start(&["--instances", "1"], &[]);
    let client = Client::with_config(OpenAIConfig::new().with_api_base(server.url("/v1")).with_api_key("unused"));

    let request = CreateChatCompletionRequestArgs::default()
        .model("SmolLM2-135M-Instruct")
        .max_tokens(16u32)
        .temperature(0.0)
        .messages([
            ChatCompletionRequestSystemMessageArgs::default().content("You are terse.").build().unwrap().into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("What is the capital of France?")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap();
    // Greedy text repeats only from the same cache state: this first call
    // decodes the whole prompt in one batch, the next ones reuse all of it but
    // its last token, so the streamed answer is compared with the second.
    client.chat().create(request.clone()).await.unwrap();
    let response = client.chat().create(request.clone()).await.unwrap();
    let text = response.choices[0].message.content.clone().unwrap();
    assert!(!text.is_empty());
    assert_eq!(response.model, "SmolLM2-135M-Instruct.Q4_1", "the served model's id, not the one asked for");
    let usage = response.usage.unwrap();
    assert!(usage.prompt_tokens > 5 && usage.completion_tokens > 0);

    let mut stream_req = request.clone();
    stream_req.stream = Some(true);
    stream_req.stream_options = Some(async_openai::types::chat::ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = client.chat().create_stream(stream_req).await.unwrap();
    let (mut streamed, mut finish, mut streamed_usage) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                streamed.push_str(t);
            }
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            streamed_usage = chunk.usage;
        }
    }
    assert_eq!(streamed, text, "greedy streaming equals the non-streamed answer");
    assert!(finish.is_some());
    assert_eq!(streamed_usage.unwrap().completion_tokens, usage.completion_tokens);

    let emb = client
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model("all-MiniLM-L6-v2")
                .input(["How do I cook pasta?", "Boil the noodles in salted water."])
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(emb.data.len(), 2);
    assert_eq!(emb.data[0].embedding.len(), 384);
    let cos: f32 = emb.data[0].embedding.iter().zip(&emb.data[1].embedding).map(|(a, b)| a * b).sum();
    assert!(cos > 0.4, "related sentences: {cos}");
}

#[actix::test]
async fn chat_endpoint_keeps_conversations_streams_and_deletes() {
    let server = Server::start(&["--instances", "1"], &[]);
    let c = http();
    let r: Value = c
        .post(server.url("/chat"))
        .json(&json!({ "message": "My favourite colour is teal.", "max_tokens": 12, "temperature": 0 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["conversation_id"].as_str().unwrap().to_string();
    assert!(!r["response"].as_str().unwrap().is_empty(), "{r}");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Streaming, continuing the same conversation.
    let body = c
        .post(server.url("/chat"))
        .json(&json!({ "message": "Which colour do I like?", "conversation_id": id, "max_tokens": 12, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(body.headers()["content-type"], "text/event-stream");
    let events = sse_events(&body.text().await.unwrap());
    assert_eq!(events[0].0, "start");
    assert!(events[0].1.contains(&id));
    let tokens: String = events
        .iter()
        .filter(|(e, _)| e == "token")
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    let (last_event, last_data) = events.last().unwrap();
    assert_eq!(last_event, "done", "{events:?}");
    let done: Value = serde_json::from_str(last_data).unwrap();
    assert_eq!(done["response"].as_str().unwrap(), tokens);
    assert_eq!(done["conversation_id"], id.as_str());

    let history: Value = c.get(server.url(&format!("/conversations/{id}"))).send().await.unwrap().json().await.unwrap();
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0]["content"], "My favourite colour is teal.");
    assert_eq!(messages[2]["role"], "user");
    assert_eq!(messages[3]["content"].as_str().unwrap(), tokens);
    let page: Value =
        c.get(server.url(&format!("/conversations/{id}?limit=3"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);
    let next = page["next_after"].as_u64().unwrap();
    let rest: Value =
        c.get(server.url(&format!("/conversations/{id}?after={next}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1);

    let del = c.delete(server.url(&format!("/conversations/{id}"))).send().await.unwrap();
    assert_eq!(del.status(), 200);
    let gone = c.get(server.url(&format!("/conversations/{id}"))).send().await.unwrap();
    assert_eq!(gone.status(), 404);
}

#[actix::test]
async fn overload_two_instances_queue_of_two_eight_requests() {
    let server = Server::start(&["--instances", "2"], &[("MODELPOOL_MAX_QUEUE", "2")]);
    let body = json!({ "messages": [{ "role": "user", "content": "Write a long story about a dragon." }], "max_tokens": 48, "temperature": 0 });
    let started = Instant::now();
    let requests = (0..8).map(|_| {
        let (url, body) = (server.url("/v1/chat/completions"), body.clone());
        async move {
            let r = http().post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let at = started.elapsed();
            (status, retry_after, at, r.text().await.unwrap())
        }
    });
    let results = futures::future::join_all(requests).await;
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!((ok.len(), rejected.len()), (4, 4), "{results:#?}");
    let slowest_ok = ok.iter().map(|r| r.2).max().unwrap();
    for r in &rejected {
        assert_eq!(r.1.as_deref(), Some("1"), "503 carries Retry-After");
        assert!(r.2 < slowest_ok / 2, "rejected at once ({:?}), not after waiting ({slowest_ok:?})", r.2);
        let e: Value = serde_json::from_str(&r.3).unwrap();
        assert_eq!(e["error"]["type"], "overloaded_error");
        assert!(e["error"]["message"].as_str().unwrap().contains("queue is full"));
    }

    let pool = pool(&server).await;
    assert_eq!(
        (pool["available"].as_u64(), pool["in_use"].as_u64(), pool["queued"].as_u64()),
        (Some(2), Some(0), Some(0)),
        "{pool:#}"
    );
    assert_eq!(pool["totals"]["requests"], 4, "{pool:#}");
    let per_instance: u64 = pool["instances"].as_array().unwrap().iter().map(|i| i["requests"].as_u64().unwrap()).sum();
    assert_eq!(per_instance, 4);

    let metrics = metrics(&server).await;
    assert!(metrics.contains(r#"modelpool_requests_total{endpoint="chat_completions",outcome="ok"} 4"#), "{metrics}");
    assert!(
        metrics.contains(r#"modelpool_requests_total{endpoint="chat_completions",outcome="overloaded_error"} 4"#),
        "{metrics}"
    );
    let series: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("modelpool_instance_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(series, 4, "per-instance series agree with /pool");
    assert!(metrics.contains(r#"modelpool_queue_depth 0"#));
}

#[actix::test]
async fn a_dropped_stream_frees_its_instance_and_stops_generating() {
    let server = Server::start(&["--instances", "1"], &[]);
    let body = json!({ "messages": [{ "role": "user", "content": "Write a very long essay about the ocean." }], "max_tokens": 400, "stream": true });
    let response = http().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let mut bytes = response.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let chunk = bytes.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    assert_eq!(pool(&server).await["in_use"], 1);
    drop(bytes);
    wait_pool(&server, Duration::from_secs(5), "instance freed by the dropped stream", |s| {
        s["in_use"] == 0 && s["available"] == 1
    })
    .await;
    let tokens = pool(&server).await["totals"]["tokens"].as_u64().unwrap();
    assert!(tokens < 100, "generation stopped early, not after all 400 tokens ({tokens})");
}

#[actix::test]
async fn metrics_pass_promtool_with_one_series_per_instance() {
    let server = Server::start(&["--instances", "3"], &[]);
    let r = http()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = metrics(&server).await;
    for i in 0..3 {
        assert!(text.contains(&format!("modelpool_instance_tokens_total{{instance=\"{i}\"}}")), "{text}");
        assert!(text.contains(&format!("modelpool_instance_state{{instance=\"{i}\",state=\"idle\"}} 1")), "{text}");
    }
    let promtool = which_promtool();
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which_promtool() -> String {
    for p in ["/usr/bin/promtool", "/usr/local/bin/promtool"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("promtool is missing: scripts/setup.sh installs it (Debian package prometheus)");
}

#[actix::test]
async fn every_client_error_has_its_status_type_and_message() {
    let server = Server::start(&["--instances", "1"], &[("MODELPOOL_SERVER_MAX_BODY_BYTES", "4096")]);
    let s = &server;
    // 400: malformed JSON, missing field, invalid field (field, rule and value named).
    expect_error(request(s, "POST", "/chat", Some("{\"message\": ")), 400, "invalid_request_error", &["invalid JSON"])
        .await;
    expect_error(request(s, "POST", "/chat", Some("{}")), 400, "invalid_request_error", &["message"]).await;
    expect_error(
        request(s, "POST", "/chat", Some(r#"{"message":"hi","temperature":5}"#)),
        400,
        "invalid_request_error",
        &["temperature", "between 0 and 2", "5"],
    )
    .await;
    expect_error(
        request(s, "POST", "/chat", Some(r#"{"message":"hi","max_tokens":0}"#)),
        400,
        "invalid_request_error",
        &["max_tokens", "at least 1", "0"],
    )
    .await;
    expect_error(
        request(s, "POST", "/chat", Some(r#"{"message":"hi","conversation_id":"nope"}"#)),
        400,
        "invalid_request_error",
        &["conversation_id", "UUID", "nope"],
    )
    .await;
    expect_error(
        request(s, "POST", "/v1/chat/completions", Some(r#"{"messages":[]}"#)),
        400,
        "invalid_request_error",
        &["messages", "at least one"],
    )
    .await;
    expect_error(
        request(s, "POST", "/v1/chat/completions", Some(r#"{"messages":[{"role":"function","content":"x"}]}"#)),
        400,
        "invalid_request_error",
        &["messages[0].role", "function"],
    )
    .await;
    expect_error(
        request(s, "POST", "/v1/chat/completions", Some(r#"{"messages":[{"role":"user","content":"x"}],"top_p":1.5}"#)),
        400,
        "invalid_request_error",
        &["top_p", "1.5"],
    )
    .await;
    expect_error(
        request(s, "POST", "/v1/embeddings", Some(r#"{"input":[]}"#)),
        400,
        "invalid_request_error",
        &["input", "got 0"],
    )
    .await;
    expect_error(
        request(s, "POST", "/v1/embeddings", Some(r#"{"input":[1,"two"]}"#)),
        400,
        "invalid_request_error",
        &["input", "string"],
    )
    .await;
    expect_error(
        request(s, "GET", "/conversations/abc?limit=0", None),
        400,
        "invalid_request_error",
        &["conversation_id"],
    )
    .await;
    let id = uuid::Uuid::new_v4();
    expect_error(
        request(s, "GET", &format!("/conversations/{id}?limit=0"), None),
        400,
        "invalid_request_error",
        &["limit", "between 1 and 1000", "0"],
    )
    .await;
    // 404: unknown conversation, unknown route.
    expect_error(request(s, "GET", &format!("/conversations/{id}"), None), 404, "not_found_error", &[&id.to_string()])
        .await;
    expect_error(request(s, "DELETE", &format!("/conversations/{id}"), None), 404, "not_found_error", &["not found"])
        .await;
    expect_error(
        request(s, "POST", "/chat", Some(&format!(r#"{{"message":"hi","conversation_id":"{id}"}}"#))),
        404,
        "not_found_error",
        &["not found"],
    )
    .await;
    expect_error(request(s, "GET", "/nowhere", None), 404, "not_found_error", &["/nowhere"]).await;
    // 413: body over the limit.
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(8000));
    expect_error(request(s, "POST", "/chat", Some(&big)), 413, "request_too_large", &["4096"]).await;
    // 422: prompt longer than the context (n_ctx 512).
    let long = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}],"max_tokens":16}}"#, "word ".repeat(700));
    expect_error(
        request(s, "POST", "/v1/chat/completions", Some(&long)),
        422,
        "context_length_exceeded",
        &["512", "16"],
    )
    .await;
    // The error names the field that holds the prompt on each route.
    let long_message = format!(r#"{{"message":"{}","max_tokens":16}}"#, "word ".repeat(700));
    let long_prompt = format!(r#"{{"prompt":"{}","max_tokens":16}}"#, "word ".repeat(700));
    for (path, body, field) in [
        ("/v1/chat/completions", &long, "messages"),
        ("/chat", &long_message, "message"),
        ("/v1/completions", &long_prompt, "prompt"),
    ] {
        let r = request(s, "POST", path, Some(body)).send().await.unwrap();
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!((status, v["error"]["param"].as_str()), (422, Some(field)), "{path}: {v}");
    }
    // Nothing above took or leaked an instance.
    let pool = pool(s).await;
    assert_eq!((pool["available"].as_u64(), pool["totals"]["requests"].as_u64()), (Some(1), Some(0)), "{pool:#}");
}

#[actix::test]
async fn api_keys_guard_everything_but_health() {
    let server = Server::start(&["--instances", "1"], &[("MODELPOOL_SERVER_API_KEYS", "secret-1,secret-2")]);
    let s = &server;
    expect_error(request(s, "GET", "/pool", None), 401, "authentication_error", &["API key"]).await;
    expect_error(
        request(s, "POST", "/chat", Some(r#"{"message":"hi"}"#)).header("authorization", "Bearer wrong"),
        401,
        "authentication_error",
        &["Bearer"],
    )
    .await;
    let ok = http().get(server.url("/pool")).header("authorization", "Bearer secret-2").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(http().get(server.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(http().get(server.url("/metrics")).send().await.unwrap().status(), 200, "metrics open by default");
}

#[actix::test]
async fn waiting_past_the_acquire_timeout_is_a_504() {
    let server = Server::start(&["--instances", "1"], &[("MODELPOOL_ACQUIRE_TIMEOUT_MS", "300")]);
    let long = json!({ "messages": [{ "role": "user", "content": "Write a long story." }], "max_tokens": 200, "stream": true });
    let running = http().post(server.url("/v1/chat/completions")).json(&long).send().await.unwrap();
    wait_pool(&server, Duration::from_secs(5), "the instance busy", |s| s["in_use"] == 1).await;
    let short = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    expect_error(request(&server, "POST", "/v1/chat/completions", Some(short)), 504, "timeout_error", &["300 ms"])
        .await;
    drop(running);
    wait_pool(&server, Duration::from_secs(3), "instance back, queue empty", |s| {
        s["available"] == 1 && s["queued"] == 0
    })
    .await;
}

#[actix::test]
async fn sigterm_drains_the_running_request_refuses_new_ones_and_keeps_the_conversation() {
    let mut server = Server::start(&["--instances", "1"], &[]);
    let c = http();
    let url = server.url("/chat");
    let running = actix::spawn(async move {
        http()
            .post(url)
            .json(
                &json!({ "message": "Tell me a long story about a lighthouse.", "max_tokens": 120, "temperature": 0 }),
            )
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    wait_pool(&server, Duration::from_secs(5), "the instance busy", |s| s["in_use"] == 1).await;
    signal(server.child.id(), "TERM");
    // Readiness turns 503 and new work is refused while the running request finishes.
    let mut refused = false;
    for _ in 0..50 {
        match c.post(server.url("/chat")).json(&json!({ "message": "hi" })).send().await {
            Ok(r) if r.status() == 503 => {
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "shutting_down");
                assert_eq!(c.get(server.url("/health/ready")).send().await.unwrap().status(), 503);
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "new requests were not refused while draining");
    let reply = running.await.unwrap();
    let id = reply["conversation_id"].as_str().unwrap().to_string();
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{reply}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}\n{}", server.log_text());

    // The conversation is on disk.
    use modelpool_actors::memory::Store;
    let store =
        modelpool_actors::memory::store::SledStore::open(server.data_dir.path(), modelpool_actors::Durability::Sync)
            .unwrap();
    let id = uuid::Uuid::parse_str(&id).unwrap();
    let messages = store.messages(&id, None, 10).await.unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].content, reply["response"].as_str().unwrap());
}

#[actix::test]
async fn conversations_are_listed_newest_first_in_pages_with_titles_and_only_to_their_namespace() {
    let server = Server::start(
        &["--instances", "1"],
        &[("MODELPOOL_SERVER_API_KEYS", "ka,kb"), ("MODELPOOL_SERVER_KEY_NAMESPACES", "ka=team-a,kb=team-b")],
    );
    let c = http();
    let say = |key: &'static str, text: &'static str| {
        let c = c.clone();
        let url = server.url("/chat");
        async move {
            let r: Value = c
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "message": text, "max_tokens": 2 }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["conversation_id"].as_str().unwrap().to_string()
        }
    };
    let first = say("ka", "First:   a question\nover two lines").await;
    let long = "x".repeat(80);
    let second = say("ka", Box::leak(long.into_boxed_str())).await;
    let third = say("ka", "Third one").await;
    let other = say("kb", "Not yours").await;
    let list = |key: &'static str, q: String| {
        let c = c.clone();
        let url = server.url(&format!("/conversations{q}"));
        async move {
            let res = c.get(url).bearer_auth(key).send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, page) = list("ka", "?limit=2".into()).await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> =
        page["conversations"].as_array().unwrap().iter().map(|c| c["conversation_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [third.as_str(), second.as_str()], "newest first");
    assert_eq!(page["conversations"][1]["title"], format!("{}…", "x".repeat(60)));
    let next = page["next_before"].as_str().unwrap().to_string();
    let (_, rest) = list("ka", format!("?limit=2&before={next}")).await;
    assert_eq!(rest["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(rest["conversations"][0]["conversation_id"], first.as_str());
    assert_eq!(rest["conversations"][0]["title"], "First: a question over two lines");
    assert_eq!(rest["next_before"], Value::Null);
    let (_, theirs) = list("kb", String::new()).await;
    assert_eq!(theirs["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(theirs["conversations"][0]["conversation_id"], other.as_str());
    let (status, err) = list("ka", "?limit=0".into()).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("limit")), "{err}");
    let (status, err) = list("ka", "?before=yesterday".into()).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("before")), "{err}");
    // Empty values are absent, as docs/http-api.md writes the route (`?before=&limit=`).
    let (status, all) = list("ka", "?before=&limit=".into()).await;
    assert_eq!((status, all["conversations"].as_array().map(Vec::len)), (200, Some(3)), "{all}");
}

/// A streaming request that waits for a slot gets its answer's headers and
/// SSE comments while it waits, then its tokens once a slot frees: on `/v1`
/// and on a `/chat` turn, whose `start` event then names its conversation.
#[actix::test]
async fn a_queued_stream_starts_with_keep_alive_comments_and_then_generates() {
    // Room for a long answer: the slot must stay taken for the whole round
    // however fast this machine decodes (see `long` below).
    let server = Server::start(&["--instances", "1", "--n-ctx", "4096"], &[("MODELPOOL_SLOTS", "1")]);
    let queued_requests = [
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "Say hi." }], "max_tokens": 4, "stream": true }),
            "[DONE]",
        ),
        ("/chat", json!({ "message": "Say hi.", "max_tokens": 4, "stream": true }), "event: done"),
    ];
    for (path, short, end) in queued_requests {
        // A raw prompt the model continues without end (it counts on), read
        // no further than its first chunk: its sequence runs until the
        // socket buffers and its channel are full, then pauses holding the
        // slot, so the slot stays taken for the whole round however fast
        // this machine decodes (440 tokens took under 3 s on a fast one).
        let counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,";
        let long = json!({ "prompt": counting, "max_tokens": 4000, "temperature": 0, "stream": true });
        let running = http().post(server.url("/v1/completions")).json(&long).send().await.unwrap();
        if running.status() != 200 {
            panic!("{path}: {}", running.text().await.unwrap_or_default());
        }
        let mut running = running.bytes_stream();
        assert!(running.next().await.is_some_and(|c| c.is_ok()));
        wait_pool(&server, Duration::from_secs(10), "the only slot held", |s| s["in_use"] == 1).await;

        // A client that leaves while queued, after its answer started, gives
        // its place up: its closed socket is seen before an idle stream's
        // next comment (3 s) would have told.
        let left = tokio::time::timeout(Duration::from_secs(30), http().post(server.url(path)).json(&short).send())
            .await
            .expect("the queued request's headers came while it waited")
            .unwrap();
        assert_eq!(left.status(), 200, "{path}");
        drop(left);
        wait_pool(&server, Duration::from_millis(2500), "the queue empty", |s| s["queued"] == 0).await;

        let queued = tokio::time::timeout(Duration::from_secs(30), http().post(server.url(path)).json(&short).send())
            .await
            .expect("the queued request's headers came while it waited")
            .unwrap();
        assert_eq!(queued.status(), 200, "{path}");
        assert_eq!(pool(&server).await["queued"], 1, "{path}: the answer started while the request was queued");
        let mut body = queued.bytes_stream();
        let mut seen = String::new();
        while !seen.contains(": keep-alive") {
            let chunk =
                tokio::time::timeout(Duration::from_secs(30), body.next()).await.expect("a comment while queued");
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        }
        assert!(!seen.contains("data:"), "{path}: nothing but comments while queued: {seen}");
        drop(running);
        while !seen.contains(end) {
            let chunk =
                tokio::time::timeout(Duration::from_secs(60), body.next()).await.expect("the reply after the wait");
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        }
        match path {
            "/chat" => assert!(seen.contains("event: start") && seen.contains("\"conversation_id\""), "{seen}"),
            _ => assert!(seen.contains("\"finish_reason\""), "{seen}"),
        }
        wait_pool(&server, Duration::from_secs(30), "the slot free", |s| s["in_use"] == 0).await;
    }
}
