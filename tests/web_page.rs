//! The chat page at `/`, in a real browser: Debian's Chromium, headless,
//! driven through chromedriver (WebDriver) against a real server on the
//! default model. Replies stream in, conversations come back after a reload,
//! recalled memory shows under a reply, Stop cancels the generation, markup
//! in a message stays text, and a server with API keys asks for one.
//! Screenshots (desktop and phone width) go to the test output directory.

// A std mutex held across awaits on purpose: each test has its own runtime
// and thread; the lock only keeps the browsers from running together (each
// scenario starts its own server and browser).
#![allow(clippy::await_holding_lock)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::pool;
use common::one_at_a_time;
use common::server::Server;
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver in a process group of its own: dropping it ends the group,
/// the browser it started included, also when a test fails mid-session
/// (a browser left running would load the cores under the next tests).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver on a free loopback port, and a headless Chromium session.
async fn browser(width: u32, height: u32) -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("chromedriver")
        .process_group(0)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (package chromium-driver; scripts/test.sh installs it)");
    let driver = Driver(child);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={width},{height}")],
        }),
    );
    let started = Instant::now();
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let attempt =
            ClientBuilder::new(connector).capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await;
        match attempt {
            Ok(c) => break c,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no browser session: {e}"),
        }
    };
    client.set_window_size(width, height).await.unwrap();
    (driver, client)
}

/// Runs a script in the page and returns its value.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Waits until `script` returns true.
async fn until(c: &Client, limit: Duration, what: &str, script: &str) {
    let started = Instant::now();
    loop {
        if js(c, script).await == Value::Bool(true) {
            return;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Types a message and presses Enter.
async fn say(c: &Client, text: &str) {
    let input = c.find(Locator::Id("input")).await.unwrap();
    input.send_keys(text).await.unwrap();
    input.send_keys(&String::from(char::from(Key::Enter))).await.unwrap();
}

const REPLIES_DONE: &str = "return document.querySelectorAll('#messages .msg.assistant').length";

/// Sends a message and waits for its reply to finish (its meta line).
async fn turn(c: &Client, text: &str) -> String {
    let before = js(c, REPLIES_DONE).await.as_u64().unwrap();
    say(c, text).await;
    until(
        c,
        Duration::from_secs(60),
        "the reply finishes",
        &format!(
            "const r = document.querySelectorAll('#messages .msg.assistant'); \
             return r.length > {before} && r[r.length - 1].querySelector('.meta') !== null \
               && document.getElementById('stop').hidden"
        ),
    )
    .await;
    js(c, "const r = document.querySelectorAll('#messages .msg.assistant .body'); return r[r.length - 1].textContent")
        .await
        .as_str()
        .unwrap()
        .to_string()
}

fn output_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("MODELPOOL_TEST_OUTPUT").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from("target"))
            .join("test-output")
    });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[actix::test]
async fn the_page_chats_streams_remembers_stops_and_keeps_markup_as_text() {
    let _one = one_at_a_time();
    let server = Server::start(
        &[],
        &[
            ("MODELPOOL_SAMPLING_MAX_TOKENS", "48"),
            ("MODELPOOL_SAMPLING_TEMPERATURE", "0"),
            ("MODELPOOL_CHAT_RECENT_MESSAGES", "4"),
            ("MODELPOOL_HEALTH_INTERVAL_MS", "0"),
        ],
    );
    let (_driver, c) = browser(1280, 900).await;
    c.goto(&server.url("/")).await.unwrap();
    until(
        &c,
        Duration::from_secs(10),
        "the pool panel fills in",
        "return document.getElementById('pool-summary').textContent.startsWith('Available')",
    )
    .await;

    // A reply streams in: its text grows while the Stop button shows.
    say(&c, "Hello! Tell me about the sea.").await;
    let mut lengths = Vec::new();
    let started = Instant::now();
    loop {
        let v = js(
            &c,
            "const r = document.querySelectorAll('#messages .msg.assistant'); if (!r.length) return [0, false]; \
             const last = r[r.length - 1]; return [last.querySelector('.body').textContent.length, last.querySelector('.meta') !== null]",
        )
        .await;
        let (len, done) = (v[0].as_u64().unwrap(), v[1].as_bool().unwrap());
        if len > 0 && lengths.last() != Some(&len) {
            lengths.push(len);
        }
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the reply never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lengths.len() >= 3, "the reply grew piece by piece, not at once: {lengths:?}");
    let first_reply = js(&c, "return document.querySelector('#messages .msg.assistant .body').textContent").await;

    // After a reload the conversation is in the list, with its history.
    c.refresh().await.unwrap();
    until(
        &c,
        Duration::from_secs(10),
        "the list fills in",
        "return document.querySelectorAll('#conversations li').length === 1",
    )
    .await;
    let title = c.find(Locator::Css("#conversations li .open")).await.unwrap().text().await.unwrap();
    assert_eq!(title, "Hello! Tell me about the sea.");
    c.find(Locator::Css("#conversations li .open")).await.unwrap().click().await.unwrap();
    until(
        &c,
        Duration::from_secs(10),
        "the history shows",
        "return document.querySelectorAll('#messages .msg').length === 2",
    )
    .await;
    assert_eq!(
        js(&c, "return document.querySelector('#messages .msg.user .body').textContent").await,
        "Hello! Tell me about the sea."
    );
    let reopened = js(&c, "return document.querySelector('#messages .msg.assistant .body').textContent").await;
    assert_eq!(reopened.as_str().map(str::trim), first_reply.as_str().map(str::trim));

    // A fact stated, ten messages later asked about: the reply shows what
    // memory recalled, folded.
    c.find(Locator::Id("new-chat")).await.unwrap().click().await.unwrap();
    turn(&c, "My favourite city is Lisbon.").await;
    for filler in ["What is two plus two?", "Name a colour.", "Name an animal.", "What is the opposite of hot?"] {
        turn(&c, filler).await;
    }
    turn(&c, "Which city is my favourite?").await;
    let recalled = js(
        &c,
        "const r = document.querySelectorAll('#messages .msg.assistant'); const d = r[r.length - 1].querySelector('details.recalled'); \
         return d ? [d.open, d.textContent] : null",
    )
    .await;
    assert_eq!(recalled[0], false, "folded by default");
    assert!(recalled[1].as_str().unwrap().contains("Lisbon"), "recalled under the reply: {recalled}");

    // Markup in a message is shown as text, never run.
    let hostile = "<img src=x onerror=alert(1)>";
    turn(&c, hostile).await;
    let shown =
        js(&c, "const u = document.querySelectorAll('#messages .msg.user .body'); return u[u.length - 1].textContent")
            .await;
    assert_eq!(shown, hostile);
    assert_eq!(js(&c, "return document.querySelectorAll('#messages img').length").await, 0);
    assert!(c.get_alert_text().await.is_err(), "no alert ran");

    // Screenshots: desktop, then phone width.
    let out = output_dir();
    std::fs::write(out.join("chat-page-desktop.png"), c.screenshot().await.unwrap()).unwrap();
    c.set_window_size(390, 844).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        js(&c, "return getComputedStyle(document.getElementById('toggle-list')).display !== 'none'").await,
        true
    );
    std::fs::write(out.join("chat-page-phone.png"), c.screenshot().await.unwrap()).unwrap();
    eprintln!("screenshots in {}", out.display());
    c.set_window_size(1280, 900).await.unwrap();

    // Shift+Enter is a new line, not a send.
    let input = c.find(Locator::Id("input")).await.unwrap();
    let sent = js(&c, REPLIES_DONE).await;
    input.send_keys("line one").await.unwrap();
    c.execute(
        "document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', shiftKey: true, bubbles: true}))",
        vec![],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(js(&c, REPLIES_DONE).await, sent, "Shift+Enter sent nothing");
    c.execute("document.getElementById('input').value = ''", vec![]).await.unwrap();

    // Deleting a conversation asks first; once confirmed it leaves the list.
    until(
        &c,
        Duration::from_secs(10),
        "both conversations listed",
        "return document.querySelectorAll('#conversations li').length === 2",
    )
    .await;
    c.find(Locator::Css("#conversations li:last-child .delete")).await.unwrap().click().await.unwrap();
    let question = c.get_alert_text().await.unwrap();
    assert!(question.contains("Hello! Tell me about the sea."), "{question}");
    c.accept_alert().await.unwrap();
    until(
        &c,
        Duration::from_secs(10),
        "the list shrinks",
        "return document.querySelectorAll('#conversations li').length === 1",
    )
    .await;

    // Stop mid-stream cancels the generation: the pool is idle again.
    c.find(Locator::Id("new-chat")).await.unwrap().click().await.unwrap();
    let before = js(&c, REPLIES_DONE).await.as_u64().unwrap();
    say(&c, "Write a very long story about a dragon who bakes bread.").await;
    until(
        &c,
        Duration::from_secs(30),
        "the reply starts",
        &format!("const r = document.querySelectorAll('#messages .msg.assistant .body'); return r.length > {before} && r[r.length - 1].textContent.length > 0"),
    )
    .await;
    c.find(Locator::Id("stop")).await.unwrap().click().await.unwrap();
    let stopped = Instant::now();
    loop {
        let p = pool(&server).await;
        if p["in_use"] == 0 {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(2), "still generating after Stop: {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until(&c, Duration::from_secs(5), "the reply says it stopped", "const m = document.querySelectorAll('#messages .msg.assistant .meta'); return m.length > 0 && m[m.length - 1].textContent === 'stopped'").await;
    c.close().await.unwrap();
}

#[actix::test]
async fn errors_show_with_a_retry_and_a_keyed_server_asks_for_the_key_once() {
    let _one = one_at_a_time();
    let server = Server::start(
        &[],
        &[
            ("MODELPOOL_SERVER_API_KEYS", "page-key"),
            ("MODELPOOL_SAMPLING_MAX_TOKENS", "8"),
            ("MODELPOOL_MAX_QUEUE", "0"),
        ],
    );
    let (_driver, c) = browser(1280, 900).await;
    c.goto(&server.url("/")).await.unwrap();
    until(&c, Duration::from_secs(10), "the key dialog opens", "return document.getElementById('key-dialog').open")
        .await;
    let key = c.find(Locator::Id("key-input")).await.unwrap();
    key.send_keys("page-key").await.unwrap();
    key.send_keys(&String::from(char::from(Key::Enter))).await.unwrap();
    until(
        &c,
        Duration::from_secs(10),
        "the pool panel loads with the key",
        "return document.getElementById('pool-summary').textContent.startsWith('Available')",
    )
    .await;
    assert_eq!(js(&c, "return sessionStorage.getItem('modelpool-key')").await, "page-key");

    // The one slot busy and no queue: the page says 503 and offers a retry.
    let busy = reqwest::Client::new()
        .post(server.url("/chat"))
        .bearer_auth("page-key")
        .json(&json!({ "message": "Write a long story.", "max_tokens": 200, "stream": true }))
        .send()
        .await
        .unwrap();
    say(&c, "Hello?").await;
    until(&c, Duration::from_secs(10), "the error shows", "return !document.getElementById('notice').hidden").await;
    let text = js(&c, "return document.getElementById('notice').textContent").await;
    assert!(
        text.as_str().unwrap().contains("queue is full") && text.as_str().unwrap().contains("retry after 1 s"),
        "{text}"
    );
    drop(busy);
    // Once the slot is free, Retry sends the message again.
    let started = Instant::now();
    while pool_keyed(&server).await["in_use"] != 0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.find(Locator::Css("#notice button")).await.unwrap().click().await.unwrap();
    until(
        &c,
        Duration::from_secs(30),
        "the retried reply finishes",
        "const m = document.querySelectorAll('#messages .msg.assistant .meta'); return m.length === 1",
    )
    .await;
    c.close().await.unwrap();
}

async fn pool_keyed(server: &Server) -> Value {
    reqwest::Client::new().get(server.url("/pool")).bearer_auth("page-key").send().await.unwrap().json().await.unwrap()
}
