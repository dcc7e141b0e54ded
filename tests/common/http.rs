//! The client side of the tests that talk to a real server over HTTP: one
//! place for what many scenarios check the same way (an error's shape, what
//! waiting on the pool means), so that the rule cannot drift between files.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::server::Server;

/// A status read (/pool, /metrics) is answered from counters: one that
/// takes a minute is a hang, and fails the test instead of stalling it.
const STATUS_LIMIT: Duration = Duration::from_secs(60);

/// A client with no deadline of its own: the scenario's limits apply.
pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// A client whose every request fails after `limit`, for scenarios that
/// load the server and must fail, not hang, when it stops answering.
pub fn http_within(limit: Duration) -> reqwest::Client {
    reqwest::Client::builder().timeout(limit).build().unwrap()
}

/// GET `path` as JSON.
pub async fn get_json(server: &Server, path: &str) -> Value {
    http_within(STATUS_LIMIT).get(server.url(path)).send().await.unwrap().json().await.unwrap()
}

/// The pool's status (GET /pool).
pub async fn pool(server: &Server) -> Value {
    get_json(server, "/pool").await
}

/// Polls /pool until `cond` holds; returns how long it took. Panics with
/// `what` and the last status once `limit` has passed.
pub async fn wait_pool(server: &Server, limit: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let p = pool(server).await;
        if cond(&p) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}: {p:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The text of GET /metrics.
pub async fn metrics(server: &Server) -> String {
    http_within(STATUS_LIMIT).get(server.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The value of one series in a /metrics text (0 when absent).
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// A request with an optional raw JSON body: raw, so that a test can send
/// what no serializer would.
pub fn request(server: &Server, method: &str, path: &str, body: Option<&str>) -> reqwest::RequestBuilder {
    let req = http().request(method.parse().unwrap(), server.url(path));
    match body {
        Some(b) => req.header("content-type", "application/json").body(b.to_string()),
        None => req,
    }
}

/// POSTs `body` as JSON; the status and the JSON answer.
pub async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = http().post(server.url(path)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Sends `req` and checks the status, the error type and words of the
/// message, and that the message shows no file path or source location.
pub async fn expect_error(req: reqwest::RequestBuilder, status: u16, kind: &str, words: &[&str]) {
    let r = req.send().await.unwrap();
    let what = format!("{} {}", r.url().path(), status);
    assert_eq!(r.status().as_u16(), status, "{what}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], kind, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for w in words {
        assert!(msg.contains(w), "{what}: message {msg:?} lacks {w:?}");
    }
    assert!(!msg.contains("/root") && !msg.contains(".rs:"), "internal detail leaked: {msg}");
}
