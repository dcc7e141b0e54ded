//! No request ends the process or holds what others need: grammars and JSON
//! schemas built to overflow llama.cpp's recursive parsers or to make them
//! work for minutes are refused (a 400 naming the field) or answered, each
//! within a second, while /health stays quick; clients that stop reading
//! give their slots back.

mod common;

use std::time::{Duration, Instant};

use common::hostile::{self, Case, Expect};
use common::http::{http_within, pool, wait_pool};
use common::server::Server;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Seed of the random cases the suite sends (`MODELPOOL_FUZZ_SEED` and
/// `MODELPOOL_FUZZ_CASES` run others, longer; docs/http-api.md, "Bounds").
const SEED: u64 = 36;
const RANDOM_CASES: usize = 40;

/// Sends `case`; checks the outcome and returns how long it took.
async fn send(server: &Server, case: &Case) -> (u16, Duration) {
    let started = Instant::now();
    let r = http_within(Duration::from_secs(60))
        .post(server.url(case.path))
        .json(&case.body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: no answer ({e}); server log:\n{}", case.name, server.log_text()));
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let took = started.elapsed();
    // What a refusal names: OpenAI's `param`, or Ollama's message.
    let names = |field: &str| match case.path {
        hostile::OLLAMA_CHAT => body["error"].as_str().is_some_and(|m| m.contains(field)),
        _ => body["error"]["param"].as_str() == Some(field),
    };
    match (&case.expect, status) {
        (Expect::Refused(field), 400) => assert!(names(field), "{}: the 400 does not name {field}: {body}", case.name),
        (Expect::Answered, 200) => {}
        (Expect::Either, 200 | 413) => {}
        (Expect::Either, 400) => {
            let fields = ["grammar", "format", "json_schema", "response_format.json_schema.schema", "tools"];
            assert!(fields.iter().any(|f| names(f)), "{}: the 400 names no field of the request: {body}", case.name);
        }
        _ => panic!("{}: expected {:?}, got {status}: {body}", case.name, case.expect),
    }
    (status, took)
}

/// Polls /health every 20 ms on a thread of its own until told to stop;
/// returns the slowest answer.
fn watch_health(
    base: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Duration> {
    std::thread::spawn(move || {
        let addr = base.trim_start_matches("http://").to_string();
        let mut slowest = Duration::ZERO;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let started = Instant::now();
            let status = common::process::http_status(&addr, "/health", Some(Duration::from_secs(30)));
            assert_eq!(status, Some(200), "/health answers");
            slowest = slowest.max(started.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        slowest
    })
}

#[actix::test]
async fn hostile_grammars_and_schemas_are_refused_or_answered_within_a_second_and_the_server_lives() {
    let mut server = Server::start(&[], &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = watch_health(server.base.clone(), stop.clone());
    let seed = std::env::var("MODELPOOL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED);
    let n = std::env::var("MODELPOOL_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(RANDOM_CASES);
    let mut cases = hostile::fixed();
    cases.extend(hostile::random(seed, n));
    let mut slowest = (Duration::ZERO, String::new());
    let mut statuses = std::collections::BTreeMap::new();
    for case in &cases {
        let (status, took) = send(&server, case).await;
        *statuses.entry(status).or_insert(0) += 1;
        assert!(server.child.try_wait().unwrap().is_none(), "{}: the server died:\n{}", case.name, server.log_text());
        assert!(took < Duration::from_secs(1), "{}: took {took:?}", case.name);
        if took > slowest.0 {
            slowest = (took, case.name.clone());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let health = health.join().unwrap();
    eprintln!(
        "{} cases (seed {seed}): statuses {statuses:?}; slowest {:?} ({}); slowest /health {health:?}",
        cases.len(),
        slowest.0,
        slowest.1
    );
    assert!(health < Duration::from_millis(100), "/health took {health:?} while the cases ran");
    assert!(server.child.try_wait().unwrap().is_none());
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log_text());
}

/// A streamed completion with log-probabilities (big chunks) on a socket
/// whose receive buffer is 4 KiB; reads the head and then nothing.
async fn silent_client(addr: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let body = serde_json::json!({
        "prompt": "Count from one to one thousand: one, two, three,", "max_tokens": 400,
        "temperature": 0, "logprobs": 20, "stream": true,
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = stream.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));
    stream
}

/// Four clients that stop reading take every slot; their sequences pause,
/// are cut at the pause limit and give their slots back although nobody
/// polls their responses: a fifth request is served meanwhile. Read at last,
/// each silent stream ends honestly: finish_reason "length", then [DONE].
#[actix::test]
async fn four_silent_clients_give_their_slots_back_and_a_fifth_is_served() {
    let env = [
        ("MODELPOOL_SLOTS", "4"),
        ("MODELPOOL_MAX_PAUSE_MS", "2000"),
        ("MODELPOOL_SERVER_SEND_BUFFER_BYTES", "8192"),
        ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "120000"),
    ];
    let server = Server::start(&["--threads", "2", "--n-ctx", "1024"], &env);
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(silent_client(&addr).await);
    }
    wait_pool(&server, Duration::from_secs(30), "four slots in use", |p| p["in_use"] == 4).await;
    // Every slot is held by a client that reads nothing; this one must
    // still be served, once the silent ones are cut.
    let started = Instant::now();
    let body = serde_json::json!({ "prompt": "Hello", "max_tokens": 4, "temperature": 0 });
    let r = http_within(Duration::from_secs(120)).post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    eprintln!("the fifth request was served after {:?}", started.elapsed());
    // The silent clients' sockets are all still open, and no slot is held.
    wait_pool(&server, Duration::from_secs(10), "every slot free", |p| p["in_use"] == 0).await;
    let status = pool(&server).await;
    assert_eq!(status["in_use"], 0, "{status:#}");
    for mut stream in silent {
        // Read until the stream's end (the connection itself stays open).
        let mut rest = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = vec![0u8; 1 << 16];
        while !String::from_utf8_lossy(&rest).contains("data: [DONE]") && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => rest.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&rest);
        let last = common::server::sse_json(&text).into_iter().filter(|c| !c["choices"].is_null()).last();
        let last = last.unwrap_or_else(|| panic!("no chunk read: {}", &text[..text.len().min(500)]));
        assert_eq!(last["choices"][0]["finish_reason"], "length", "a cut reply must say so: {last}");
        assert!(text.contains("data: [DONE]"), "the stream did not end");
    }
}

/// Opens a streamed chat completion and returns the socket once the
/// answer's head has come (a queued request gets it after a moment).
async fn queued_stream(addr: &str, max_tokens: u32) -> tokio::net::TcpStream {
    let stream = sent_stream(addr, max_tokens).await;
    head_of(stream).await
}

/// Waits for the answer's head on `stream`.
async fn head_of(mut stream: tokio::net::TcpStream) -> tokio::net::TcpStream {
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut head)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    stream
}

/// Sends a streamed chat completion; returns at once.
async fn sent_stream(addr: &str, max_tokens: u32) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = serde_json::json!({
        "messages": [{ "role": "user", "content": "Tell me a long story about a lighthouse keeper." }],
        "max_tokens": max_tokens, "temperature": 0, "stream": true,
    })
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Streaming clients that leave while their requests wait for a slot are
/// dropped from the queue and never generated: with both slots held, eight
/// such clients come and go (four before their answer's head, four after);
/// once the slots free, nothing else runs.
#[actix::test]
async fn clients_that_leave_while_queued_are_never_generated() {
    let server = Server::start(&["--threads", "2", "--n-ctx", "1024"], &[("MODELPOOL_SLOTS", "2")]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let holders = [queued_stream(&addr, 900).await, queued_stream(&addr, 900).await];
    wait_pool(&server, Duration::from_secs(30), "both slots in use", |p| p["in_use"] == 2).await;
    // Four leave before their answer's head comes, four after it.
    let early = futures::future::join_all((0..4).map(|_| sent_stream(&addr, 64))).await;
    wait_pool(&server, Duration::from_secs(10), "four queued", |p| p["queued"] == 4).await;
    drop(early);
    wait_pool(&server, Duration::from_secs(10), "the early ones left the queue", |p| p["queued"] == 0).await;
    let late = futures::future::join_all((0..4).map(|_| queued_stream(&addr, 64))).await;
    let p = pool(&server).await;
    assert_eq!((p["in_use"].as_u64(), p["queued"].as_u64()), (Some(2), Some(4)), "{p:#}");
    drop(late);
    wait_pool(&server, Duration::from_secs(10), "the queue emptied", |p| p["queued"] == 0).await;
    // The holders' streams end (read to their end); nothing else starts.
    for mut h in holders {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 14];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !String::from_utf8_lossy(&all).contains("data: [DONE]") && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), h.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => all.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    }
    wait_pool(&server, Duration::from_secs(30), "every slot free", |p| p["in_use"] == 0).await;
    let p = pool(&server).await;
    assert_eq!(p["totals"]["requests"], 2, "only the two holders were generated: {p:#}");
}

/// Polls /pool with a key until `cond` holds (30 s at most).
async fn wait_keyed(server: &Server, what: &str, cond: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_within(Duration::from_secs(30)).get(server.url("/pool")).bearer_auth("ka").send().await.unwrap();
        let p: Value = r.json().await.unwrap();
        if cond(&p) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s: {p:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client cannot take more than its share while another waits: with
/// two slots (a share of one per key), key A holds both and queues a third;
/// once B waits too, A's next request is refused with 429 and Retry-After,
/// and B is served.
#[actix::test]
async fn a_client_past_its_share_while_another_waits_gets_429() {
    let server = Server::start(
        &["--threads", "2"],
        &[("MODELPOOL_SLOTS", "2"), ("MODELPOOL_SERVER_API_KEYS", "ka,kb"), ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "120000")],
    );
    let send = |key: &'static str, max_tokens: u32| {
        let url = server.url("/v1/chat/completions");
        async move {
            let body = serde_json::json!({
                "messages": [{ "role": "user", "content": "Tell me a long story about a lighthouse keeper." }],
                "max_tokens": max_tokens, "temperature": 0,
            });
            let r = http_within(Duration::from_secs(120)).post(url).bearer_auth(key).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (status, retry_after, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let a1 = actix::spawn(send("ka", 160));
    let a2 = actix::spawn(send("ka", 160));
    wait_keyed(&server, "A holds both slots", |p| p["in_use"] == 2).await;
    let a3 = actix::spawn(send("ka", 8));
    wait_keyed(&server, "A queues", |p| p["queued"] == 1).await;
    let b1 = actix::spawn(send("kb", 8));
    wait_keyed(&server, "B queues", |p| p["queued"] == 2).await;
    let (status, retry_after, body) = send("ka", 8).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_concurrent_per_key"), "{body}");
    for task in [a1, a2, a3, b1] {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

/// A connection whose client takes nothing is closed once no data has left
/// for `server.write_timeout_ms`: the server holds no socket and no
/// buffers for a client that never reads again.
#[actix::test]
async fn a_connection_that_takes_nothing_is_closed_after_the_write_timeout() {
    let env = [
        ("MODELPOOL_MAX_PAUSE_MS", "1000"),
        ("MODELPOOL_SERVER_WRITE_TIMEOUT_MS", "3000"),
        ("MODELPOOL_SERVER_SEND_BUFFER_BYTES", "8192"),
    ];
    let server = Server::start(&["--threads", "2", "--n-ctx", "1024"], &env);
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stream = silent_client(&addr).await;
    wait_pool(&server, Duration::from_secs(60), "the silent client's slot came back", |p| {
        p["in_use"] == 0 && p["totals"]["requests"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Everything the kernel had kept for it is gone with the connection.
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(0)) => break "closed",
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break "reset",
            Err(_) => break "still open",
        }
    };
    assert_ne!(end, "still open");
    assert!(!String::from_utf8_lossy(&all).contains("data: [DONE]"), "the answer was still there to read");
}
