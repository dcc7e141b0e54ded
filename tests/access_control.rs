//! API keys bound to namespaces: with cross-conversation recall on, one
//! tenant can neither read, continue nor recall another tenant's messages;
//! the bearer scheme is accepted in any case.

mod common;

use common::server::Server;
use serde_json::{json, Value};

async fn call(server: &Server, method: &str, path: &str, auth: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), server.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[actix::test]
async fn a_key_bound_to_a_namespace_sees_and_recalls_only_its_own() {
    let server = Server::start(
        &["--instances", "1"],
        &[
            ("MODELPOOL_SERVER_API_KEYS", "key-a,key-b"),
            ("MODELPOOL_SERVER_KEY_NAMESPACES", "key-a=team-a,key-b=team-b"),
            ("MODELPOOL_CHAT_CROSS_CONVERSATION_RECALL", "true"),
            ("MODELPOOL_CHAT_RECENT_MESSAGES", "0"),
        ],
    );
    let (a, b) = (Some("Bearer key-a"), Some("bearer key-b"));
    let say = |text: &str| json!({ "message": text, "max_tokens": 4, "temperature": 0 });

    assert_eq!(call(&server, "POST", "/chat", None, Some(say("hi"))).await.0, 401);
    assert_eq!(call(&server, "POST", "/chat", Some("Bearer key-c"), Some(say("hi"))).await.0, 401);
    assert_eq!(call(&server, "GET", "/pool", Some("BEARER key-a"), None).await.0, 200, "scheme in any case");

    let (status, first) = call(&server, "POST", "/chat", a, Some(say("My locker code is 4711."))).await;
    assert_eq!(status, 200, "{first}");
    let conv_a = first["conversation_id"].as_str().unwrap().to_string();

    // Another tenant cannot read, delete or continue it: it does not exist for them.
    let path = format!("/conversations/{conv_a}");
    assert_eq!(call(&server, "GET", &path, b, None).await.0, 404);
    assert_eq!(call(&server, "DELETE", &path, b, None).await.0, 404);
    let mut cont = say("And now?");
    cont["conversation_id"] = json!(conv_a);
    assert_eq!(call(&server, "POST", "/chat", b, Some(cont)).await.0, 404);

    // Nor name the other namespace; a malformed one is a 400 naming the rule.
    let mut other = say("hi");
    other["namespace"] = json!("team-a");
    let (status, err) = call(&server, "POST", "/chat", b, Some(other)).await;
    assert_eq!((status, err["error"]["type"].as_str()), (403, Some("permission_error")), "{err}");
    let mut long = say("hi");
    long["namespace"] = json!("n".repeat(65));
    let (status, err) = call(&server, "POST", "/chat", a, Some(long)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("64"), "{err}");

    // Cross-conversation recall stays inside the caller's namespace.
    let question = say("What is my locker code?");
    let (status, from_b) = call(&server, "POST", "/chat", b, Some(question.clone())).await;
    assert_eq!(status, 200, "{from_b}");
    assert!(from_b["recalled"].as_array().unwrap().is_empty(), "team-b recalled team-a's text: {from_b}");
    let (status, from_a) = call(&server, "POST", "/chat", a, Some(question)).await;
    assert_eq!(status, 200, "{from_a}");
    let recalled: Vec<&str> =
        from_a["recalled"].as_array().unwrap().iter().filter_map(|r| r["content"].as_str()).collect();
    assert!(recalled.contains(&"My locker code is 4711."), "team-a's own memory: {from_a}");
    assert_eq!(call(&server, "GET", &path, a, None).await.0, 200);
}

#[actix::test]
async fn a_key_bound_to_no_namespace_is_an_administrators_and_pool_says_which_keys_are() {
    let server = Server::start(
        &["--instances", "1"],
        &[("MODELPOOL_SERVER_API_KEYS", "key-a,admin-key"), ("MODELPOOL_SERVER_KEY_NAMESPACES", "key-a=team-a")],
    );
    let (a, admin) = (Some("Bearer key-a"), Some("Bearer admin-key"));
    let say = json!({ "message": "My locker code is 4711.", "max_tokens": 4, "temperature": 0 });
    let (status, r) = call(&server, "POST", "/chat", a, Some(say)).await;
    assert_eq!(status, 200, "{r}");
    let path = format!("/conversations/{}", r["conversation_id"].as_str().unwrap());
    assert_eq!(call(&server, "GET", &path, admin, None).await.0, 200, "the unbound key reads team-a's conversation");
    let (_, pool) = call(&server, "GET", "/pool", admin, None).await;
    let auth = &pool["auth"];
    assert_eq!((auth["keys"].as_u64(), auth["bound_to_a_namespace"].as_u64()), (Some(2), Some(1)), "{auth}");
    let unbound = auth["unbound_keys"].as_array().unwrap();
    assert_eq!(unbound.len(), 1, "{auth}");
    assert!(unbound[0].as_str().unwrap().starts_with("sha256:") && !auth.to_string().contains("admin-key"), "{auth}");
    assert_eq!(auth["unbound_keys_see"], "every namespace");
}
