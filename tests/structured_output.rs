//! Structured output on the real model: a JSON schema, `json_object` and a
//! GBNF grammar constrain the reply, on `/v1/chat/completions` (streamed and
//! not) and on `/chat`; what cannot be turned into a grammar is a 400 naming
//! the field. OpenAI's Python client checks replies against their schema.

mod common;

use common::http::post;
use common::server::{sse_json, Server};
use serde_json::{json, Value};

fn ask(extra: Value) -> Value {
    let mut body =
        json!({ "messages": [{ "role": "user", "content": "Do you like tea?" }], "max_tokens": 48, "temperature": 0 });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn content(r: &Value) -> &str {
    r["choices"][0]["message"]["content"].as_str().unwrap()
}

#[actix::test]
async fn a_grammar_or_a_schema_constrains_the_reply_and_a_bad_one_is_a_400_by_name() {
    let server = Server::start(&["--instances", "1"], &[]);

    // llama-server's `grammar`: the reply is one of the two words.
    let (status, r) =
        post(&server, "/v1/chat/completions", ask(json!({ "grammar": "root ::= \"yes\" | \"no\"" }))).await;
    assert_eq!(status, 200, "{r}");
    assert!(["yes", "no"].contains(&content(&r)), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // OpenAI's json_schema: parses, with the required keys and the enum.
    let schema = json!({
        "type": "object",
        "properties": {
            "answer": { "type": "string", "enum": ["yes", "no", "maybe"] },
            "cups": { "type": "integer", "minimum": 0, "maximum": 9 }
        },
        "required": ["answer", "cups"],
        "additionalProperties": false
    });
    let format = json!({ "type": "json_schema", "json_schema": { "name": "tea", "schema": schema, "strict": true } });
    let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ "response_format": format }))).await;
    assert_eq!(status, 200, "{r}");
    let v: Value = serde_json::from_str(content(&r)).unwrap_or_else(|e| panic!("not JSON ({e}): {r}"));
    assert!(["yes", "no", "maybe"].contains(&v["answer"].as_str().unwrap()), "{v}");
    assert!(v["cups"].as_u64().is_some_and(|c| c <= 9), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");

    // Streamed: the pieces assemble to JSON that follows the schema too.
    let body = ask(json!({ "response_format": format, "stream": true }));
    let text = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed: String = sse_json(&text)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    let v: Value =
        serde_json::from_str(&streamed).unwrap_or_else(|e| panic!("streamed reply not JSON ({e}): {streamed:?}"));
    assert!(v["answer"].is_string() && v["cups"].is_u64(), "{v}");

    // llama-server's json_schema field, and json_object: an object.
    let (status, r) = post(&server, "/v1/chat/completions", ask(json!({ "json_schema": schema }))).await;
    assert_eq!(status, 200, "{r}");
    assert!(serde_json::from_str::<Value>(content(&r)).is_ok_and(|v| v["answer"].is_string()), "{r}");

    // /chat takes response_format too; the stored reply is that JSON.
    let (status, r) = post(
        &server,
        "/chat",
        json!({ "message": "Do you like tea?", "max_tokens": 48, "temperature": 0, "response_format": format }),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let v: Value = serde_json::from_str(r["response"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("/chat reply not JSON ({e}): {r}"));
    assert!(v["answer"].is_string(), "{v}");

    // What cannot constrain is refused by name, before any generation.
    for (body, param) in [
        (json!({ "grammar": "root ::= missing_rule" }), "grammar"),
        (json!({ "grammar": 7 }), "grammar"),
        (json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "x" } } }), "response_format"),
        (json!({ "response_format": { "type": "xml" } }), "response_format"),
        (json!({ "json_schema": "not a schema" }), "json_schema"),
        (json!({ "grammar": "root ::= \"a\"", "json_schema": schema }), "grammar"),
    ] {
        let (status, r) = post(&server, "/v1/chat/completions", ask(body.clone())).await;
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
    }
    let (status, r) = post(&server, "/chat", json!({ "message": "hi", "response_format": { "type": "yaml" } })).await;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("response_format")), "{r}");
    // The server is unharmed.
    let (status, _) = post(&server, "/v1/chat/completions", ask(json!({}))).await;
    assert_eq!(status, 200);
}

/// OpenAI's Python client: ten prompts under a strict schema, streamed and
/// not, each reply validated by `jsonschema`.
#[actix::test]
async fn openais_python_client_gets_replies_that_validate_against_a_strict_schema() {
    let server = Server::start(&["--instances", "1"], &[]);
    common::run_python_fixture("structured_output.py", &server.url("/v1"));
}
