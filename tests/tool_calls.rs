//! Tool calls on the real model: `tools` and `tool_choice` on
//! `/v1/chat/completions` give well-formed calls (OpenAI's Python client
//! checks them against their schemas, streamed and not, and sends the result
//! back); what cannot be honoured is a 400 naming the field.

mod common;

use common::http::post;
use common::server::Server;
use serde_json::{json, Value};

fn weather() -> Value {
    json!([{ "type": "function", "function": { "name": "get_weather", "description": "Current weather of a city",
        "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } }])
}

#[actix::test]
async fn openais_python_client_gets_well_formed_calls_and_answers_to_tool_results() {
    let server = Server::start(&["--instances", "1"], &[]);
    common::run_python_fixture("tool_calls.py", &server.url("/v1"));
}

#[actix::test]
async fn what_tools_cannot_do_is_a_400_naming_the_field() {
    let server = Server::start(&["--instances", "1"], &[]);
    let ask = json!([{ "role": "user", "content": "Weather in Oslo?" }]);
    let cases = [
        (
            "/v1/chat/completions",
            json!({ "messages": ask, "tools": weather(), "tool_choice": "sometimes" }),
            "tool_choice",
        ),
        ("/v1/chat/completions", json!({ "messages": ask, "tool_choice": "required" }), "tool_choice"),
        (
            "/v1/chat/completions",
            json!({ "messages": ask, "tools": weather(), "response_format": { "type": "json_object" } }),
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": ask, "tools": [{ "type": "function", "function": { "name": "x",
                "parameters": { "type": "object", "properties": { "a": { "$ref": "#/missing" } } } } }] }),
            "tools[0].function.parameters",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "user", "content": "hi", "tool_calls": [] }] }),
            "messages[0].tool_calls",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "assistant", "content": "", "tool_calls": [{ "id": "c1", "type": "function",
                "function": { "name": "get_weather", "arguments": "{oops" } }] }, { "role": "user", "content": "?" }] }),
            "messages[0].tool_calls[0].function.arguments",
        ),
        ("/v1/chat/completions", json!({ "messages": ask, "functions": [{ "name": "f" }] }), "functions"),
        ("/v1/completions", json!({ "prompt": "Weather?", "tools": weather() }), "tools"),
        ("/chat", json!({ "message": "Weather in Oslo?", "tools": weather() }), "tools"),
    ];
    for (path, body, param) in cases {
        let (status, r) = post(&server, path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {r}");
        assert_eq!(r["error"]["param"], param, "{path} {body}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(param), "{r}");
    }

    // tool_choice "none": the tools are not offered, the reply is text.
    let (status, r) = post(
        &server,
        "/v1/chat/completions",
        json!({ "messages": ask, "tools": weather(), "tool_choice": "none", "max_tokens": 8, "temperature": 0 }),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
}
