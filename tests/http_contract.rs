//! What the OpenAI-compatible endpoints promise beyond the happy path: a
//! second client (OpenAI's own Python package), base64 embeddings, usage
//! counted with the right tokenizer, the served model's id, the penalties
//! llama-server users send, and request counts that count each request once.

mod common;

use base64::Engine as _;
use common::http::{http, metrics, post, sample};
use common::server::{sse_json, Server};
use serde_json::{json, Value};

#[actix::test]
async fn openais_python_client_embeds_in_base64_chats_streams_and_gets_404_for_unknown_models() {
    let server = Server::start(&["--instances", "1"], &[]);
    common::run_python_fixture("openai_client.py", &server.url("/v1"));
}

#[actix::test]
async fn embeddings_use_the_embedding_tokenizer_base64_and_refuse_what_they_would_cut() {
    let server = Server::start(&["--instances", "1"], &[]);
    // MiniLM sees [CLS] hello world [SEP]: 4 tokens (the chat tokenizer would say 2).
    let (status, floats) = post(&server, "/v1/embeddings", json!({ "input": "hello world" })).await;
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["usage"]["prompt_tokens"], 4, "{floats}");
    let as_float: Vec<f32> =
        floats["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();

    let (status, b64) =
        post(&server, "/v1/embeddings", json!({ "input": ["hello world"], "encoding_format": "base64" })).await;
    assert_eq!(status, 200, "{b64}");
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded.len(), 384);
    for (a, b) in decoded.iter().zip(&as_float) {
        assert!((a - b).abs() < 1e-6, "base64 and float disagree: {a} vs {b}");
    }

    let long = "word ".repeat(600);
    let (status, err) = post(&server, "/v1/embeddings", json!({ "input": ["short", long] })).await;
    assert_eq!(status, 400, "{err}");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("input[1]") && msg.contains("512") && msg.contains("602"), "{msg}");
    assert_eq!(err["error"]["param"], "input");

    let (status, err) = post(&server, "/v1/embeddings", json!({ "input": "x", "dimensions": 128 })).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("384"), "{err}");
    let (status, err) =
        post(&server, "/v1/embeddings", json!({ "input": "x", "model": "text-embedding-3-small" })).await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("model_not_found")), "{err}");
}

fn vectors(r: &Value) -> Vec<Vec<f32>> {
    let data = r["data"].as_array().unwrap();
    data.iter()
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

/// LangChain's `OpenAIEmbeddings` sends cl100k_base token ids from tiktoken
/// (for a model it does not know): they are read back to their text, so the
/// vectors are the text's.
#[actix::test]
async fn token_id_embeddings_give_the_texts_vectors() {
    let server = Server::start(&["--instances", "1"], &[]);
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    assert_eq!(cl100k.encode_ordinary("Hello world"), [9906, 1917], "the encoding LangChain uses");
    let texts = ["The quick brown fox jumps over the lazy dog.", "Olive trees grow slowly — über 100 Jahre alt."];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| cl100k.encode_ordinary(t)).collect();
    for (as_text, as_ids) in [(json!(texts[0]), json!(ids[0])), (json!(texts), json!(ids))] {
        let (status, by_text) = post(&server, "/v1/embeddings", json!({ "input": as_text })).await;
        assert_eq!(status, 200, "{by_text}");
        let (status, by_ids) = post(&server, "/v1/embeddings", json!({ "input": as_ids })).await;
        assert_eq!(status, 200, "{by_ids}");
        assert_eq!(by_ids["usage"], by_text["usage"], "counted with the embedding model's tokenizer");
        let (a, b) = (vectors(&by_text), vectors(&by_ids));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let cosine: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            assert!(cosine > 0.9999, "the same text, the same vector: cosine {cosine}");
        }
    }
    for (input, names) in [(json!([9906, -1]), "input[1]"), (json!([[9906], [1917, 999_999]]), "input[1][1]")] {
        let (status, err) = post(&server, "/v1/embeddings", json!({ "input": input })).await;
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some("input")), "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(names), "{err}");
    }
}

/// `/v1/models/{id}` answers one served model by its id (or its id without
/// the quantisation suffix), else 404 `model_not_found`.
#[actix::test]
async fn one_model_is_answered_by_its_id() {
    let server = Server::start(&["--instances", "1"], &[]);
    for (id, purpose) in [
        ("SmolLM2-135M-Instruct.Q4_1", "chat"),
        ("SmolLM2-135M-Instruct", "chat"),
        ("all-MiniLM-L6-v2.Q8_0", "embeddings"),
    ] {
        let r = http().get(server.url(&format!("/v1/models/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{id}");
        let m: Value = r.json().await.unwrap();
        assert_eq!((m["object"].as_str(), m["purpose"].as_str()), (Some("model"), Some(purpose)), "{m}");
        assert!(m["id"].as_str().unwrap().starts_with(id), "{m}");
    }
    let r = http().get(server.url("/v1/models/gpt-4o")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "model_not_found", "{err}");
}

#[actix::test]
async fn completions_answer_with_the_served_model_and_honour_penalties() {
    let server = Server::start(&["--instances", "1"], &[]);
    let ask = |extra: Value| {
        let mut body = json!({
            "messages": [{ "role": "user", "content": "Repeat after me: la la la la la la la la la la" }],
            "max_tokens": 32, "temperature": 0,
        });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, ok) = post(&server, "/v1/chat/completions", ask(json!({}))).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["model"], "SmolLM2-135M-Instruct.Q4_1");

    let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ "model": "gpt-4o" }))).await;
    assert_eq!(status, 404, "{r}");
    assert_eq!((r["error"]["code"].as_str(), r["error"]["param"].as_str()), (Some("model_not_found"), Some("model")));

    // Penalties change greedy text: a strong repeat penalty over a long window.
    let plain = ok["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let penalised =
        json!({ "repeat_penalty": 1.8, "frequency_penalty": 1.5, "presence_penalty": 1.5, "top_k": 5, "min_p": 0.1 });
    let (status, p) = post(&server, "/v1/chat/completions", ask(penalised)).await;
    assert_eq!(status, 200, "{p}");
    assert_ne!(p["choices"][0]["message"]["content"].as_str().unwrap(), plain, "the penalties were ignored");

    for (field, value, rule) in [
        ("frequency_penalty", json!(2.5), "between -2 and 2"),
        ("presence_penalty", json!(-3), "between -2 and 2"),
        ("min_p", json!(1.5), "between 0 and 1"),
        ("top_k", json!(-1), "between 0 (off) and the vocabulary size"),
        ("repeat_penalty", json!(0), "greater than 0"),
    ] {
        let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ field: value }))).await;
        assert_eq!(status, 400, "{field}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field) && msg.contains(rule), "{field}: {msg}");
    }
    let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ "tools": [{ "type": "function" }] }))).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "tools[0].function");
    // llama-server's sampling fields this server does not implement change
    // the answer: refused by name, never ignored; their neutral values pass.
    for (field, value) in [
        ("mirostat", json!(2)),
        ("typical_p", json!(0.5)),
        ("dry_multiplier", json!(0.8)),
        ("xtc_probability", json!(0.5)),
        ("n_probs", json!(3)),
        ("ignore_eos", json!(true)),
        ("samplers", json!(["top_k"])),
    ] {
        let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ field: value }))).await;
        assert_eq!(status, 400, "{field}: {r}");
        assert_eq!(r["error"]["param"], field, "{r}");
    }
    let neutral = json!({ "mirostat": 0, "typical_p": 1.0, "n_probs": 0, "ignore_eos": false, "grammar": "" });
    let (status, r) = post(&server, "/v1/chat/completions", ask(neutral)).await;
    assert_eq!(status, 200, "neutral values change nothing: {r}");
    let (status, r) =
        post(&server, "/v1/chat/completions", ask(json!({ "user": "u1", "store": false, "metadata": {} }))).await;
    assert_eq!(status, 200, "options that do not apply are ignored: {r}");
}

#[actix::test]
async fn a_request_that_fails_after_admission_is_counted_once() {
    // Every generation outlives max_generation_ms: admitted, then 504.
    let server = Server::start(&["--instances", "1"], &[("MODELPOOL_MAX_GENERATION_MS", "1")]);
    let body = json!({ "messages": [{ "role": "user", "content": "Write a long story." }], "max_tokens": 200 });
    let (status, r) = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 504, "{r}");
    let (status, r) = post(&server, "/chat", json!({ "message": "Write a long story.", "max_tokens": 200 })).await;
    assert_eq!(status, 504, "{r}");
    let (status, _) = post(&server, "/chat", json!({ "message": "" })).await;
    assert_eq!(status, 400);

    let metrics = metrics(&server).await;
    let count = |endpoint: &str, outcome: &str| {
        sample(&metrics, &format!("modelpool_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}}"))
    };
    assert_eq!(count("chat_completions", "timeout_error"), 1.0, "{metrics}");
    assert_eq!(count("chat", "timeout_error"), 1.0, "{metrics}");
    assert_eq!(count("chat", "invalid_request_error"), 1.0, "{metrics}");
    let all: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("modelpool_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(all, 3.0, "three requests, three counts:\n{metrics}");
}

/// GET `path` with `host` as the Host header; the status.
async fn get_as(server: &Server, path: &str, host: &str) -> u16 {
    let c = reqwest::Client::new();
    c.get(server.url(path)).header("host", host).send().await.unwrap().status().as_u16()
}

#[actix::test]
async fn on_loopback_only_loopback_host_names_are_answered_so_dns_rebinding_reads_nothing() {
    let server = Server::start(&[], &[]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    // A page on evil.example that rebinds its name to 127.0.0.1 sends Host: evil.example.
    for path in ["/conversations", "/pool", "/metrics", "/v1/models"] {
        assert_eq!(get_as(&server, path, &format!("evil.example:{port}")).await, 403, "{path}");
        assert_eq!(get_as(&server, path, &format!("localhost:{port}")).await, 200, "{path}");
        assert_eq!(get_as(&server, path, &format!("127.0.0.1:{port}")).await, 200, "{path}");
    }
    let c = reqwest::Client::new();
    let res = c.get(server.url("/conversations")).header("host", "evil.example").send().await.unwrap();
    let body: Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("server.allowed_hosts"), "{body}");
    drop(server);
    // A name the operator adds is answered too.
    let server = Server::start(&[], &[("MODELPOOL_SERVER_ALLOWED_HOSTS", "chat.internal")]);
    assert_eq!(get_as(&server, "/pool", "chat.internal").await, 200);
    assert_eq!(get_as(&server, "/pool", "evil.example").await, 403);
}

/// CORS is off by default; `server.cors_origins` lets the pages of the
/// origins it names read answers (preflight included), and no other.
#[actix::test]
async fn browser_pages_of_allowed_origins_get_cors_headers_and_others_none() {
    let c = reqwest::Client::new();
    let allow = |res: &reqwest::Response| {
        res.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string())
    };
    let server = Server::start(&[], &[]);
    let res = c.get(server.url("/v1/models")).header("origin", "http://app.example").send().await.unwrap();
    assert_eq!((res.status().as_u16(), allow(&res)), (200, None), "no CORS unless configured");
    drop(server);

    let server =
        Server::start(&[], &[("MODELPOOL_SERVER_CORS_ORIGINS", "http://app.example,https://tools.example:8443")]);
    let res = c.get(server.url("/v1/models")).header("origin", "http://app.example").send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(allow(&res).as_deref(), Some("http://app.example"));
    let preflight = c
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://tools.example:8443")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(allow(&preflight).as_deref(), Some("https://tools.example:8443"));
    let methods = preflight.headers().get("access-control-allow-methods").unwrap().to_str().unwrap().to_string();
    assert!(methods.contains("POST"), "{methods}");
    let res = c.get(server.url("/v1/models")).header("origin", "http://evil.example").send().await.unwrap();
    assert_eq!((res.status().as_u16(), allow(&res)), (200, None), "another origin gets no CORS headers");
    drop(server);

    // An origin that is not one is refused at start-up, by name.
    let out = common::modelpool_command()
        .args(["serve", "--instances", "1"])
        .env("MODELPOOL_SERVER_CORS_ORIGINS", "app.example/path")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("server.cors_origins") && err.contains("app.example/path"), "{err}");
}

/// `/v1/models` says which model chats and which embeds; a chat request
/// naming the embedding model is a 400 saying so; with `include_usage`,
/// chunks before the last carry `"usage": null`, as OpenAI's do.
#[actix::test]
async fn models_have_a_purpose_and_streamed_chunks_carry_null_usage() {
    let server = Server::start(&["--instances", "1"], &[]);
    let models: Value = http().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let purposes: Vec<(&str, &str)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["purpose"].as_str().unwrap()))
        .collect();
    assert_eq!(purposes, [("SmolLM2-135M-Instruct.Q4_1", "chat"), ("all-MiniLM-L6-v2.Q8_0", "embeddings")]);
    let ask =
        json!({ "model": "all-MiniLM-L6-v2", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 2 });
    let (status, r) = post(&server, "/v1/chat/completions", ask).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "model");
    assert!(r["error"]["message"].as_str().unwrap().contains("embedding model"), "{r}");

    let body = json!({ "messages": [{ "role": "user", "content": "Say hi." }], "max_tokens": 6, "stream": true, "stream_options": { "include_usage": true } });
    let text = http().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap().text().await.unwrap();
    let chunks = sse_json(&text);
    let (last, before) = chunks.split_last().unwrap();
    assert!(!before.is_empty());
    for c in before {
        assert!(c.as_object().unwrap().contains_key("usage") && c["usage"].is_null(), "{c}");
    }
    assert!(last["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{last}");
}

/// Ollama's official Python client against `/api/*`: chat, generate, embed,
/// list, show, ps; `format` with a schema; refusals by name.
#[actix::test]
async fn ollamas_python_client_chats_generates_embeds_and_lists() {
    let server = Server::start(&["--instances", "1"], &[]);
    common::run_python_fixture("ollama_client.py", &server.base);
    let version: Value = http().get(server.url("/api/version")).send().await.unwrap().json().await.unwrap();
    assert!(version["version"].is_string(), "{version}");
}

/// `/v1/completions`: a prompt the client wrote whole, without the chat
/// template, answered as `text_completion`, streamed or not; what it cannot
/// honour is a 400 naming the field.
#[actix::test]
async fn text_completions_take_a_raw_prompt_streamed_or_not() {
    let server = Server::start(&["--instances", "1"], &[]);
    let body = json!({ "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0 });
    let (status, r) = post(&server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(!r["choices"][0]["text"].as_str().unwrap().is_empty(), "{r}");
    // No chat template (SmolLM2's adds a system prompt of ~30 tokens): the prompt alone.
    let prompt_tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((3..10).contains(&prompt_tokens), "{r}");

    // The client's own template markers are parsed: a chat by hand.
    let by_hand = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n";
    let (status, r) = post(
        &server,
        "/v1/completions",
        json!({ "prompt": [by_hand], "max_tokens": 12, "temperature": 0, "stop": ["<|im_end|>"] }),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(!text.contains("<|im_end|>") && !text.is_empty(), "{r}");
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() < 20, "markers are single tokens: {r}");

    let body = json!({ "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": true, "stream_options": { "include_usage": true } });
    let text = http().post(server.url("/v1/completions")).json(&body).send().await.unwrap().text().await.unwrap();
    let chunks = sse_json(&text);
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert!(!streamed.is_empty(), "{text}");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"), "{text}");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()), "{text}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 10, "{text}");

    for (body, param) in [
        (json!({ "prompt": [[1, 2], [3]] }), "prompt"),
        (json!({ "prompt": [1, 49_152] }), "prompt"),
        (json!({ "prompt": [1, -2] }), "prompt"),
        (json!({ "prompt": [] }), "prompt"),
        (json!({ "prompt": ["a", "b"] }), "prompt"),
        (json!({ "prompt": "" }), "prompt"),
        (json!({ "prompt": "hi", "echo": true }), "echo"),
        (json!({ "prompt": "hi", "suffix": "end" }), "suffix"),
        (json!({ "prompt": "hi", "best_of": 3 }), "best_of"),
        (json!({ "prompt": "hi", "logprobs": 21 }), "logprobs"),
    ] {
        let (status, r) = post(&server, "/v1/completions", body.clone()).await;
        assert_eq!((status, r["error"]["param"].as_str()), (400, Some(param)), "{body}: {r}");
    }
}

/// Token ids of the served model's vocabulary are a prompt as they are (as
/// llama-server takes them), and without `max_tokens` a reply runs to the end
/// of the context, as llama-server and OpenAI do.
#[actix::test]
async fn token_id_prompts_are_taken_and_replies_run_to_the_end_of_the_context() {
    let server = Server::start(&["--instances", "1"], &[]);
    let ids = [504, 3575, 282, 4649, 314];
    for prompt in [json!(ids), json!([ids])] {
        let (status, r) =
            post(&server, "/v1/completions", json!({ "prompt": prompt, "max_tokens": 4, "temperature": 0 })).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["usage"]["prompt_tokens"], ids.len(), "the ids as they are: {r}");
        assert_eq!(r["usage"]["completion_tokens"], 4, "{r}");
    }
    let (status, err) = post(&server, "/v1/completions", json!({ "prompt": [1, 49_152] })).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("prompt[1] = 49152"), "{err}");

    // A grammar with no end: only the context can stop the reply.
    let endless = json!({ "prompt": "Letters:", "temperature": 0, "grammar": "root ::= \"a\" root" });
    let (status, r) = post(&server, "/v1/completions", endless).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert_eq!(r["usage"]["total_tokens"], 512, "prompt and reply fill n_ctx=512: {r}");
}

/// `logprobs` from the distribution before sampling: at temperature 0 with
/// no penalty each chosen token is the first of its alternatives, which
/// are sorted and at most 0; streamed, each chunk carries its tokens'.
#[actix::test]
async fn logprobs_list_each_token_and_its_sorted_alternatives() {
    let server = Server::start(&["--instances", "1"], &[]);
    let check = |entries: &[Value], top: usize| {
        for e in entries {
            let alts = e["top_logprobs"].as_array().unwrap();
            assert_eq!(alts.len(), top, "{e}");
            assert_eq!(alts[0]["token"], e["token"], "the greedy choice is the most likely: {e}");
            let lps: Vec<f64> = alts.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
            assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{e}");
            assert!((e["logprob"].as_f64().unwrap() - lps[0]).abs() < 1e-4, "{e}");
            let bytes: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
            assert_eq!(String::from_utf8_lossy(&bytes), e["token"].as_str().unwrap());
        }
    };
    let body = json!({ "messages": [{ "role": "user", "content": "Name a fruit." }], "max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0, "logprobs": true, "top_logprobs": 5 });
    let (status, r) = post(&server, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    let entries = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap(), "one entry per token: {r}");
    check(entries, 5);
    let joined: String = entries.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(joined, r["choices"][0]["message"]["content"].as_str().unwrap());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text =
        http().post(server.url("/v1/chat/completions")).json(&streamed).send().await.unwrap().text().await.unwrap();
    let mut all = Vec::new();
    for c in sse_json(&text) {
        if let Some(entries) = c["choices"][0]["logprobs"]["content"].as_array() {
            all.extend(entries.iter().cloned());
        }
    }
    assert!(!all.is_empty(), "{text}");
    check(&all, 5);

    // /v1/completions: the legacy shape.
    let (status, r) = post(
        &server,
        "/v1/completions",
        json!({ "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "repeat_penalty": 1.0, "logprobs": 3 }),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 4, "{r}");
    for (i, t) in tokens.iter().enumerate() {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3 && top.contains_key(t.as_str().unwrap()), "{r}");
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0);
    }
    for (body, param) in [
        (json!({ "logprobs": true, "top_logprobs": 21 }), "top_logprobs"),
        (json!({ "top_logprobs": 3 }), "top_logprobs"),
        (json!({ "logprobs": "yes" }), "logprobs"),
    ] {
        let mut b = json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 2 });
        for (k, v) in body.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (status, r) = post(&server, "/v1/chat/completions", b).await;
        assert_eq!((status, r["error"]["param"].as_str()), (400, Some(param)), "{body}: {r}");
    }
}

/// What the fuzzer over the OpenAPI document found, each answered as the
/// document says: a method a path does not serve is a 405 naming those it
/// does; Ollama's routes read a body without Content-Type (litellm sends
/// none) and answer a bad body in Ollama's shape; a load request checks its
/// options; a whole number written `8.0` is one; a field of the wrong type
/// is refused by name instead of being ignored.
#[actix::test]
async fn answers_are_what_the_openapi_document_says() {
    let server = Server::start(&["--instances", "1"], &[]);
    let r = http().request(reqwest::Method::TRACE, server.url("/chat")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = http().delete(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 405);

    // Ollama: no Content-Type at all, then a body that is not JSON.
    let r = http().post(server.url("/api/chat")).body(r#"{"messages": []}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["done_reason"], "load", "{v}");
    let r = http().post(server.url("/api/generate")).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().is_some_and(|m| m.contains("JSON")), "not Ollama's error shape: {v}");
    let (status, v) = post(&server, "/api/chat", json!({ "messages": [], "options": { "tfs_z": {} } })).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("options.tfs_z"), "{v}");

    let chat = |extra: Value| {
        let mut body = json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 4.0 });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, v) = post(&server, "/v1/chat/completions", chat(json!({ "seed": 7.0 }))).await;
    assert_eq!(status, 200, "{v}");
    for (field, value) in
        [("logit_bias", json!("x")), ("user", json!(5)), ("prompt_cache_key", json!([])), ("grammar", json!({}))]
    {
        let (status, v) = post(&server, "/v1/chat/completions", chat(json!({ field: value }))).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(field)), "{field}={value}: {v}");
    }
    let (status, v) = post(&server, "/v1/chat/completions", chat(json!({ "max_tokens": 4.5 }))).await;
    assert_eq!(status, 400, "{v}");
    // What the reply does not depend on still has its type.
    let named = json!({ "message": "hi", "response_format": { "type": "json_schema", "json_schema": { "name": [1], "schema": {} } } });
    let (status, v) = post(&server, "/chat", named).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("response_format")), "{v}");
    // A load request's options are held to their bounds too.
    let (status, v) =
        post(&server, "/api/chat", json!({ "messages": [], "options": { "presence_penalty": -1e308 } })).await;
    assert_eq!(status, 400, "{v}");
    // An import over the body limit: a 413 in the API's shape (was actix's plain text).
    let huge = json!({ "messages": [{ "role": "user", "content": "x".repeat(1 << 20) }] });
    let (status, v) = post(&server, "/conversations/import", huge).await;
    assert_eq!((status, v["error"]["type"].as_str()), (413, Some("request_too_large")), "{v}");
    // A date past the year 9999 (2⁶³ ms would not fit PostgreSQL's bigint).
    let doc = json!({ "messages": [{ "role": "user", "content": "hi", "created_at": 9223372036854775808u64 }] });
    let (status, v) = post(&server, "/conversations/import", doc).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("created_at"), "{v}");
}
