//! Two replicas on one PostgreSQL store behind HAProxy (Debian's package)
//! running the shipped `deploy/haproxy.cfg` with its ports rewritten:
//! every turn of a conversation lands on one replica (`X-Modelpool-Node`),
//! both replicas get conversations, the `X-Conversation-Id` header a client
//! sends back continues the conversation like the body field, and when a
//! replica is killed its conversations go on on the other one, with their
//! memory. Also: PostgreSQL stopped and started again under a replica.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::haproxy;
use common::postgres::Postgres;
use common::server::Server;
use serde_json::{json, Value};

async fn turn(c: &reqwest::Client, base: &str, conversation: Option<&str>, text: &str) -> (String, String, Value) {
    let mut req = c.post(format!("{base}/chat")).json(&json!({ "message": text, "max_tokens": 6, "temperature": 0 }));
    if let Some(id) = conversation {
        req = req.header("X-Conversation-Id", id);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let header = |name: &str| res.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (id, node) = (header("x-conversation-id"), header("x-modelpool-node"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["conversation_id"], id.as_str(), "the header names the body's conversation");
    (id, node, body)
}

/// A replica on the shared store, remembering 2 recent messages (so a fact
/// from the first turn is out of the window by the third and must be recalled).
fn replica(node: &str, store: &str) -> Server {
    Server::start(
        &[],
        &[("MODELPOOL_SERVER_NODE", node), ("MODELPOOL_STORE", store), ("MODELPOOL_CHAT_RECENT_MESSAGES", "2")],
    )
}

async fn wait_ready(c: &reqwest::Client, base: &str) {
    let started = Instant::now();
    while c.get(format!("{base}/health/ready")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(20), "{base} is not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FACTS: [&str; 6] = [
    "My cat is called Biscuit and she sleeps on the piano.",
    "The spare house key is hidden under the blue flowerpot.",
    "My sister Alma lives in Lisbon and teaches violin.",
    "I parked the car on level four, spot 17.",
    "My dentist appointment is on Tuesday at nine.",
    "The wifi password is written on the fridge calendar.",
];
const QUESTIONS: [&str; 6] = [
    "What is the name of my kitty?",
    "Where can I find the key to my home?",
    "Where does my sister live?",
    "Where did I leave the car?",
    "When do I see the dentist?",
    "Where is the wifi password?",
];

#[actix::test]
async fn conversations_stay_on_one_replica_and_survive_losing_it() {
    let pg = Postgres::start();
    let store = pg.create_database("replicas");
    let a = replica("node-a", &store);
    let mut b = replica("node-b", &store);
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, base) = haproxy::start(&a.base, &b.base, dir.path());
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_ready(&c, &base).await;

    // Turns 1-2 of 6 conversations: a fact, then small talk. Later turns
    // send only the header back.
    let mut ids = Vec::new();
    let mut nodes: Vec<Vec<String>> = Vec::new();
    let mut acked: Vec<Vec<u64>> = Vec::new();
    for fact in FACTS {
        let (id, node, body) = turn(&c, &base, None, fact).await;
        ids.push(id);
        nodes.push(vec![node]);
        acked.push(vec![body["message_id"].as_u64().unwrap()]);
    }
    for i in 0..6 {
        let (id, node, body) = turn(&c, &base, Some(&ids[i]), "How many legs does a spider have?").await;
        assert_eq!(id, ids[i], "{body}");
        nodes[i].push(node);
        acked[i].push(body["message_id"].as_u64().unwrap());
    }
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n[0], n[1], "conversation {} moved between replicas: {n:?}", ids[i]);
        *per_node.entry(n[0].clone()).or_default() += 1;
    }
    assert_eq!(
        per_node.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["node-a".into(), "node-b".into()]),
        "both replicas get conversations: {per_node:?}"
    );

    // Lose node-b (SIGKILL: no drain). Its conversations' next turns are
    // answered by node-a, which has never seen them, and recall their facts.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let killed = Instant::now();
    let mut first_moved = None;
    for round in 0..2 {
        for i in 0..6 {
            let (text, want_fact) = if round == 0 { (QUESTIONS[i], true) } else { ("Thanks, and good night.", false) };
            let sent = Instant::now();
            let (id, node, body) = turn(&c, &base, Some(&ids[i]), text).await;
            assert_eq!(id, ids[i]);
            assert_eq!(node, "node-a", "after the kill only node-a answers: {body}");
            if want_fact {
                let recalled: Vec<&str> =
                    body["recalled"].as_array().unwrap().iter().map(|r| r["content"].as_str().unwrap()).collect();
                assert!(recalled.contains(&FACTS[i]), "conversation {i} (was on {}) recalls {recalled:?}", nodes[i][0]);
            }
            if nodes[i][0] == "node-b" && first_moved.is_none() {
                // The first moved turn: HAProxy retries the refused connection
                // on the other replica at once, before its health checks
                // (every 1 s, 2 failures) even mark node-b down.
                let took = sent.elapsed();
                eprintln!("first moved turn: sent {:?} after the kill, answered in {took:?}", sent - killed);
                assert!(took < Duration::from_secs(2), "{took:?}: {body}");
                first_moved = Some(took);
            }
            nodes[i].push(node);
            acked[i].push(body["message_id"].as_u64().unwrap());
        }
    }
    assert!(first_moved.is_some(), "node-b held a conversation");

    // Every acknowledged message is in PostgreSQL, in order, none twice:
    // 4 turns, user + assistant each.
    for (i, id) in ids.iter().enumerate() {
        let rows = pg.sql(
            "replicas",
            &format!("SELECT id, seq, role FROM messages WHERE conversation_id = '{id}' ORDER BY seq"),
        );
        let rows: Vec<(u64, u64, String)> = rows
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].to_string())
            })
            .collect();
        assert_eq!(rows.len(), 8, "conversation {i}: {rows:?}");
        assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
        let roles: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        assert_eq!(roles, ["user", "assistant"].repeat(4));
        let replies: Vec<u64> = rows.iter().filter(|r| r.2 == "assistant").map(|r| r.0).collect();
        assert_eq!(replies, acked[i], "conversation {i}: the acknowledged replies, in order");
        let distinct: BTreeSet<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(distinct.len(), 8);
    }

    // A streamed answer carries the same headers, and goes to the same replica.
    let res = c
        .post(format!("{base}/chat"))
        .header("X-Conversation-Id", ids[1].as_str())
        .json(&json!({ "message": "One more?", "max_tokens": 4, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers().get("x-conversation-id").unwrap(), ids[1].as_str());
    assert_eq!(res.headers().get("x-modelpool-node").unwrap(), "node-a");
    assert!(res.text().await.unwrap().contains("event: done"));

    // The header and the body must agree when both are sent.
    let res = c
        .post(a.url("/chat"))
        .header("X-Conversation-Id", ids[0].as_str())
        .json(&json!({ "message": "hi", "conversation_id": uuid::Uuid::new_v4().to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["param"], "conversation_id", "{body}");
}

#[actix::test]
async fn a_replica_rides_out_a_postgres_restart() {
    let pg = Postgres::start();
    let store = pg.create_database("outage");
    let a = replica("node-a", &store);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (id, _, first) = turn(&c, &a.base, None, FACTS[0]).await;
    let mut acked = vec![first["message_id"].as_u64().unwrap()];

    pg.stop_server();
    // Readiness turns 503 storage_unavailable (HAProxy drains the replica);
    // liveness stays 200 (nothing to restart: it reconnects by itself).
    let started = Instant::now();
    let ready = loop {
        let r = c.get(a.url("/health/ready")).send().await.unwrap();
        if r.status() == 503 {
            break r.json::<Value>().await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "readiness still 200 with PostgreSQL down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["status"], "storage_unavailable", "{ready}");
    assert!(!ready["cause"].as_str().unwrap().contains("unused-password"), "{ready}");
    assert_eq!(c.get(a.url("/health/live")).send().await.unwrap().status(), 200);
    // A turn is refused with 503 and Retry-After, and nothing half-done stays.
    let res = c
        .post(a.url("/chat"))
        .header("X-Conversation-Id", id.as_str())
        .json(&json!({ "message": "Are you there?", "max_tokens": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "storage_unavailable", "{body}");
    let new = c.post(a.url("/chat")).json(&json!({ "message": "New here.", "max_tokens": 4 })).send().await.unwrap();
    assert_eq!(new.status(), 503);

    // PostgreSQL comes back: so does the replica, by itself.
    pg.start_server();
    let back = Instant::now();
    while c.get(a.url("/health/ready")).send().await.unwrap().status() != 200 {
        assert!(back.elapsed() < Duration::from_secs(15), "the replica did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready again {:?} after PostgreSQL restarted", back.elapsed());
    let (again, _, body) = turn(&c, &a.base, Some(&id), QUESTIONS[0]).await;
    assert_eq!(again, id);
    acked.push(body["message_id"].as_u64().unwrap());
    let rows = pg.sql("outage", &format!("SELECT id, role FROM messages WHERE conversation_id = '{id}' ORDER BY seq"));
    let replies: Vec<u64> = rows
        .lines()
        .filter(|l| l.ends_with("|assistant"))
        .map(|l| l.split('|').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(replies, acked, "{rows}");
    assert_eq!(rows.lines().count(), 4, "the refused turn left nothing: {rows}");
    assert_eq!(
        pg.sql("outage", "SELECT count(*) FROM conversations").trim(),
        "1",
        "the refused new conversation left nothing"
    );
}
