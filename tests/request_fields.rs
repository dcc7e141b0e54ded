//! No field is silently ignored: every request field that OpenAI's,
//! llama-server's and Ollama's documentation list for the routes served
//! here is sent with a value that would change the answer, and the server's
//! reply is checked against docs/http-api.md's table of request fields: honoured
//! (a 200), refused (a 400 that names the field), or ignored because it
//! cannot change the answer (a 200).

mod common;

use std::collections::BTreeMap;

use common::server::Server;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";
const OLLAMA_CHAT: &str = "/api/chat";
const OLLAMA_GENERATE: &str = "/api/generate";

/// The documented fields, each with a value that asks for something other
/// than the default (a field listed for several routes is sent to each).
fn documented() -> Vec<(&'static [&'static str], &'static str, Value)> {
    let both: &'static [&'static str] = &[CHAT, TEXT];
    let chat: &'static [&'static str] = &[CHAT];
    let text: &'static [&'static str] = &[TEXT];
    let ollama: &'static [&'static str] = &[OLLAMA_CHAT, OLLAMA_GENERATE];
    let weather = json!([{ "type": "function", "function": { "name": "weather", "parameters": { "type": "object", "properties": { "city": { "type": "string" } } } } }]);
    vec![
        // OpenAI: chat completions (https://platform.openai.com/docs/api-reference/chat/create).
        (chat, "messages", json!([{ "role": "user", "content": "Hello there" }])),
        (both, "model", json!("SmolLM2-135M-Instruct")),
        (chat, "audio", json!({ "voice": "alloy", "format": "wav" })),
        (both, "frequency_penalty", json!(0.5)),
        (chat, "function_call", json!("auto")),
        (chat, "functions", json!([{ "name": "f", "parameters": {} }])),
        (both, "logit_bias", json!({ "50256": -100 })),
        (chat, "logprobs", json!(true)),
        (text, "logprobs", json!(2)),
        (both, "max_tokens", json!(3)),
        (chat, "max_completion_tokens", json!(3)),
        (chat, "metadata", json!({ "team": "a" })),
        (chat, "modalities", json!(["text", "audio"])),
        (both, "n", json!(2)),
        (chat, "parallel_tool_calls", json!(true)),
        (chat, "prediction", json!({ "type": "content", "content": "Hello" })),
        (both, "presence_penalty", json!(0.5)),
        (both, "prompt_cache_key", json!("conversation-7")),
        (chat, "reasoning_effort", json!("high")),
        (chat, "response_format", json!({ "type": "json_object" })),
        (chat, "safety_identifier", json!("user-hash")),
        (both, "seed", json!(7)),
        (chat, "service_tier", json!("flex")),
        (both, "stop", json!(["\n"])),
        (chat, "store", json!(true)),
        (both, "stream", json!(true)),
        (both, "stream_options", json!({ "include_usage": true })),
        (both, "temperature", json!(0.5)),
        (chat, "tool_choice", json!("none")),
        (chat, "tools", weather),
        (chat, "top_logprobs", json!(2)),
        (both, "top_p", json!(0.5)),
        (both, "user", json!("user-1")),
        (chat, "verbosity", json!("low")),
        (chat, "web_search_options", json!({})),
        // OpenAI: completions (https://platform.openai.com/docs/api-reference/completions/create).
        (text, "prompt", json!("Hello there")),
        (text, "best_of", json!(2)),
        (text, "echo", json!(true)),
        (text, "suffix", json!(" the end.")),
        // llama-server's /completion and /v1 options (tools/server/README.md).
        (both, "dynatemp_range", json!(0.5)),
        (both, "dynatemp_exponent", json!(2.0)),
        (both, "top_k", json!(5)),
        (both, "min_p", json!(0.1)),
        (both, "n_predict", json!(3)),
        (both, "n_indent", json!(4)),
        (both, "n_keep", json!(8)),
        (both, "typical_p", json!(0.5)),
        (both, "repeat_penalty", json!(1.3)),
        (both, "repeat_last_n", json!(16)),
        (both, "dry_multiplier", json!(0.8)),
        (both, "dry_base", json!(2.0)),
        (both, "dry_allowed_length", json!(3)),
        (both, "dry_penalty_last_n", json!(16)),
        (both, "dry_sequence_breakers", json!(["\n", ":"])),
        (both, "xtc_probability", json!(0.5)),
        (both, "xtc_threshold", json!(0.2)),
        (both, "mirostat", json!(2)),
        (both, "mirostat_tau", json!(4.0)),
        (both, "mirostat_eta", json!(0.2)),
        (both, "grammar", json!("root ::= \"yes\" | \"no\"")),
        (both, "json_schema", json!({ "type": "object" })),
        (both, "ignore_eos", json!(true)),
        (both, "n_probs", json!(3)),
        (both, "min_keep", json!(5)),
        (both, "t_max_predict_ms", json!(100)),
        (both, "id_slot", json!(0)),
        (both, "cache_prompt", json!(false)),
        (both, "return_tokens", json!(true)),
        (both, "samplers", json!(["top_k", "temperature"])),
        (both, "timings_per_token", json!(true)),
        (both, "return_progress", json!(true)),
        (both, "post_sampling_probs", json!(true)),
        (both, "response_fields", json!(["content"])),
        (both, "lora", json!([{ "id": 0, "scale": 0.5 }])),
        (both, "top_n_sigma", json!(1.5)),
        (both, "chat_template_kwargs", json!({ "enable_thinking": false })),
        (both, "reasoning_format", json!("deepseek")),
        // Ollama's /api/chat and /api/generate (docs/api.md).
        (ollama, "model", json!("SmolLM2-135M-Instruct:latest")),
        (&[OLLAMA_CHAT], "messages", json!([{ "role": "user", "content": "Hello there" }])),
        (
            &[OLLAMA_CHAT],
            "tools",
            json!([{ "type": "function", "function": { "name": "weather", "parameters": { "type": "object", "properties": {} } } }]),
        ),
        (ollama, "format", json!("json")),
        (ollama, "options", json!({ "temperature": 0.5 })),
        (ollama, "stream", json!(true)),
        (ollama, "keep_alive", json!("10m")),
        (ollama, "think", json!(true)),
        (&[OLLAMA_GENERATE], "prompt", json!("Hello there")),
        (&[OLLAMA_GENERATE], "suffix", json!(" the end.")),
        (&[OLLAMA_GENERATE], "images", json!(["aGVsbG8="])),
        (&[OLLAMA_GENERATE], "system", json!("Answer in French.")),
        (&[OLLAMA_GENERATE], "template", json!("{{ .Prompt }}")),
        (&[OLLAMA_GENERATE], "raw", json!(true)),
        (&[OLLAMA_GENERATE], "context", json!([1, 2, 3])),
        // Ollama's options (docs/api.md, "Generate request (with options)").
        (ollama, "options.num_keep", json!(5)),
        (ollama, "options.seed", json!(42)),
        (ollama, "options.num_predict", json!(3)),
        (ollama, "options.top_k", json!(20)),
        (ollama, "options.top_p", json!(0.9)),
        (ollama, "options.min_p", json!(0.1)),
        (ollama, "options.typical_p", json!(0.7)),
        (ollama, "options.repeat_last_n", json!(33)),
        (ollama, "options.temperature", json!(0.8)),
        (ollama, "options.repeat_penalty", json!(1.2)),
        (ollama, "options.presence_penalty", json!(1.5)),
        (ollama, "options.frequency_penalty", json!(1.0)),
        (ollama, "options.penalize_newline", json!(true)),
        (ollama, "options.stop", json!(["\n", "user:"])),
        (ollama, "options.numa", json!(false)),
        (ollama, "options.num_ctx", json!(256)),
        (ollama, "options.num_batch", json!(2)),
        (ollama, "options.num_gpu", json!(1)),
        (ollama, "options.main_gpu", json!(0)),
        (ollama, "options.use_mmap", json!(true)),
        (ollama, "options.num_thread", json!(8)),
        (ollama, "options.mirostat", json!(1)),
        (ollama, "options.mirostat_tau", json!(0.8)),
        (ollama, "options.mirostat_eta", json!(0.6)),
        (ollama, "options.tfs_z", json!(0.5)),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Here {
    Honoured,
    Refused,
    Ignored,
}

/// docs/http-api.md's table: (route, field) → what the server does with it.
fn readme_table() -> BTreeMap<(String, String), Here> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/http-api.md")).unwrap();
    let section = readme.split("## Request fields").nth(1).expect("docs/http-api.md has a table of request fields");
    let section = section.split("\n## ").next().unwrap();
    let mut table = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 3, "a row of field, routes and what is done: {row}");
        let field = cells[0].trim_matches('`').to_string();
        let here = match cells[2].split([' ', ':', ',']).next() {
            Some("honoured") => Here::Honoured,
            Some("refused") => Here::Refused,
            Some("ignored") => Here::Ignored,
            other => panic!("{row}: says {other:?}, not honoured, refused or ignored"),
        };
        for route in cells[1].split_whitespace() {
            let previous = table.insert((route.trim_matches('`').to_string(), field.clone()), here);
            assert!(previous.is_none(), "{field} on {route} is in the table twice");
        }
    }
    table
}

/// The smallest request of each route; a field under test goes on top.
fn base(route: &str) -> Value {
    match route {
        CHAT => json!({ "messages": [{ "role": "user", "content": "Hi" }], "max_tokens": 2 }),
        TEXT => json!({ "prompt": "Hi", "max_tokens": 2 }),
        OLLAMA_CHAT => {
            json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": false, "options": { "num_predict": 2 } })
        }
        OLLAMA_GENERATE => json!({ "prompt": "Hi", "stream": false, "options": { "num_predict": 2 } }),
        other => panic!("no base request for {other}"),
    }
}

fn with_field(mut body: Value, field: &str, value: &Value) -> Value {
    match field.strip_prefix("options.") {
        Some(option) => body["options"][option] = value.clone(),
        None if field == "options" => {
            body["options"].as_object_mut().unwrap().extend(value.as_object().unwrap().clone());
        }
        None => body[field] = value.clone(),
    }
    // `top_logprobs` asks for alternatives of `logprobs`.
    if field == "top_logprobs" {
        body["logprobs"] = json!(true);
    }
    body
}

#[actix::test]
async fn every_documented_field_is_honoured_refused_by_name_or_ignored_as_the_readme_says() {
    let table = readme_table();
    let documented = documented();
    let mut walked = std::collections::BTreeSet::new();
    for (routes, field, _) in &documented {
        for route in *routes {
            assert!(
                table.contains_key(&(route.to_string(), field.to_string())),
                "{field} on {route} is documented there but missing from docs/http-api.md's table"
            );
            walked.insert((route.to_string(), field.to_string()));
        }
    }
    for key in table.keys() {
        assert!(walked.contains(key), "docs/http-api.md lists {key:?}, which no documentation of that route has");
    }

    let server = Server::start(&["--instances", "1"], &[]);
    let http = reqwest::Client::new();
    let mut wrong = Vec::new();
    for (routes, field, value) in documented {
        for route in routes {
            let here = table[&(route.to_string(), field.to_string())];
            let body = with_field(base(route), field, &value);
            let r = http.post(server.url(route)).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let named = match route.starts_with("/api/") {
                // Ollama's errors are {"error": "message"}: the message names the field.
                true => error["error"].as_str().is_some_and(|m| m.contains(field)),
                false => error["error"]["param"] == field,
            };
            let fine = match here {
                Here::Refused => status == 400 && named,
                Here::Honoured | Here::Ignored => status == 200,
            };
            if !fine {
                wrong.push(format!("{route} {field}={value}: http-api.md says {here:?}, got {status} {text:.200}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{} field(s) behave otherwise than http-api.md says:\n{}", wrong.len(), wrong.join("\n"));
}
