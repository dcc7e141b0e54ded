//! Two replicas behind HAProxy (Debian's package) running the shipped
//! `deploy/haproxy.cfg` with its ports rewritten: every turn of a
//! conversation lands on one replica (`X-Modelpool-Node`), the replicas share
//! the conversations between them, and the `X-Conversation-Id` header a
//! client sends back continues the conversation like the body field.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{json, Value};

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_of(server: &Server) -> String {
    server.base.rsplit(':').next().unwrap().to_string()
}

/// HAProxy with the shipped configuration, on a free port, in front of `a` and `b`.
fn start_proxy(a: &Server, b: &Server, dir: &std::path::Path) -> (Proxy, String) {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rewritten = shipped
        .replace("bind :8080", &format!("bind 127.0.0.1:{port}"))
        .replace("server node1 127.0.0.1:8081", &format!("server node1 127.0.0.1:{}", port_of(a)))
        .replace("server node2 127.0.0.1:8082", &format!("server node2 127.0.0.1:{}", port_of(b)));
    assert_ne!(rewritten, shipped);
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, rewritten).unwrap();
    let check =
        Command::new("haproxy").args(["-c", "-f", cfg.to_str().unwrap()]).output().expect("haproxy (package haproxy)");
    assert!(check.status.success(), "the shipped config is valid: {}", String::from_utf8_lossy(&check.stderr));
    let child = Command::new("haproxy")
        .args(["-db", "-f", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Proxy(child), format!("http://127.0.0.1:{port}"))
}

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

#[actix::test]
async fn each_conversation_stays_on_one_replica_behind_haproxy() {
    let a = Server::start(&[], &[("MODELPOOL_SERVER_NODE", "node-a")]);
    let b = Server::start(&[], &[("MODELPOOL_SERVER_NODE", "node-b")]);
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, base) = start_proxy(&a, &b, dir.path());
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let started = Instant::now();
    while c.get(format!("{base}/health/ready")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(20), "the proxy does not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 6 conversations × 4 turns; later turns send only the header back.
    let conversation = |i: usize| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let (id, node, _) = turn(&c, &base, None, &format!("Hello, I am person {i}.")).await;
            let mut nodes = vec![node];
            for t in 1..4 {
                let (again, node, body) =
                    turn(&c, &base, Some(&id), &format!("Question {t}: what is my number?")).await;
                assert_eq!(again, id, "{body}");
                nodes.push(node);
            }
            (id, nodes)
        }
    };
    let runs = futures::future::join_all((0..6).map(conversation)).await;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (id, nodes) in &runs {
        let distinct: BTreeSet<&String> = nodes.iter().collect();
        assert_eq!(distinct.len(), 1, "conversation {id} moved between replicas: {nodes:?}");
        *per_node.entry(nodes[0].clone()).or_default() += 1;
    }
    assert_eq!(
        per_node.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["node-a".into(), "node-b".into()]),
        "{per_node:?}"
    );
    // Every turn of each conversation is stored on its replica, in order.
    for (id, nodes) in &runs {
        let home = if nodes[0] == "node-a" { &a } else { &b };
        let conv: Value = c.get(home.url(&format!("/conversations/{id}"))).send().await.unwrap().json().await.unwrap();
        assert_eq!(conv["messages"].as_array().unwrap().len(), 8, "{conv}");
    }

    // A streamed answer carries the same headers, and goes to the same replica.
    let (id, nodes) = &runs[1];
    let res = c
        .post(format!("{base}/chat"))
        .header("X-Conversation-Id", id.as_str())
        .json(&json!({ "message": "One more?", "max_tokens": 4, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers().get("x-conversation-id").unwrap(), id.as_str());
    assert_eq!(res.headers().get("x-modelpool-node").unwrap(), nodes[0].as_str());
    assert!(res.text().await.unwrap().contains("event: done"));

    // The header and the body must agree when both are sent.
    let (id, _) = &runs[0];
    let res = c
        .post(a.url("/chat"))
        .header("X-Conversation-Id", id.as_str())
        .json(&json!({ "message": "hi", "conversation_id": uuid::Uuid::new_v4().to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["param"], "conversation_id", "{body}");
}
