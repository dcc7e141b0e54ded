//! OpenAI-compatible `POST /v1/chat/completions` (stateless: the client sends
//! the conversation) and `GET /v1/models`.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::disconnect::unless_client_gone;
use super::{sse_response, unix_now, ApiError, ApiState, Authorized, SamplingOverrides};
use crate::engine::CacheKey;
use crate::params::{ChatMessage, FinishReason, GenerateRequest, Role, Usage};
use crate::pool::lease::GenEvent;

/// `content` as a string or as an array of `{"type": "text", "text": ...}` parts.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// llama.cpp extensions that llama-server users send.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    /// Options that would change the answer in ways this server cannot honour
    /// are refused (`tools`, `logprobs`, a non-empty `logit_bias`);
    /// `response_format`, `json_schema` and `grammar` constrain the reply
    /// ([`super::structured`]); the rest (`user`, `metadata`, `store`,
    /// `service_tier`, …) are accepted and ignored, as OpenAI-compatible servers do.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// Refuses the OpenAI options this server cannot honour, naming each.
fn refuse_unsupported(other: &HashMap<String, Value>) -> Result<(), ApiError> {
    let unsupported = |field: &str, got: &Value| {
        Err(ApiError::bad(field, format!("invalid {field}: not supported by this server, got {}", short_json(got))))
    };
    for (field, v) in other {
        match field.as_str() {
            "tools" | "functions" if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) => {
                return unsupported(field, v)
            }
            "tool_choice" | "function_call" if !v.is_null() && v != "none" && v != "auto" => {
                return unsupported(field, v)
            }
            "logprobs" if !v.is_null() && v.as_bool() != Some(false) => return unsupported(field, v),
            "top_logprobs" if !v.is_null() && v.as_i64() != Some(0) => return unsupported(field, v),
            "logit_bias" if v.as_object().is_some_and(|o| !o.is_empty()) => return unsupported(field, v),
            // llama-server's own fields that would change the answer: refused
            // unless they carry the value that changes nothing.
            f if changes_the_answer(f, v) => return unsupported(field, v),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a llama-server sampling field this server does not implement
/// asks for something other than its neutral value (which changes nothing).
fn changes_the_answer(field: &str, v: &Value) -> bool {
    if v.is_null() {
        return false;
    }
    let number = |neutral: f64| v.as_f64().is_none_or(|x| x != neutral);
    match field {
        "samplers" | "dry_sequence_breakers" => match v {
            Value::String(s) => !s.is_empty(),
            Value::Object(o) => !o.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        },
        "mirostat" | "n_probs" | "dry_multiplier" | "xtc_probability" | "dynatemp_range" | "top_n_sigma" => {
            // top_n_sigma: −1 is off in llama-server.
            number(0.0) && !(field == "top_n_sigma" && v.as_f64() == Some(-1.0))
        }
        "typical_p" => number(1.0),
        "ignore_eos" => v.as_bool() != Some(false),
        "n_predict" => true,
        _ => false,
    }
}

/// The first 60 characters of a JSON value, for error messages.
pub(crate) fn short_json(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// Checks a request's `model` against the served one, whose id is the GGUF
/// file's stem (`SmolLM2-135M-Instruct.Q4_1`); the stem without its last
/// `.suffix` (`SmolLM2-135M-Instruct`) names it too. Absent or empty: the served one.
pub(crate) fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(m) if !m.is_empty() && m != served && served.rsplit_once('.').map(|(base, _)| base) != Some(m) => {
            Err(ApiError::ModelNotFound(m.chars().take(200).collect()))
        }
        _ => Ok(()),
    }
}

fn convert_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "invalid messages: must contain at least one message, got []"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!("invalid messages[{i}].role: must be system, developer, user or assistant, got {other:?}"),
                    ))
                }
            };
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::bad(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("invalid messages[{i}].content[{j}]: only text parts are supported, got type {kind:?}"),
                                ))
                            }
                        }
                    }
                    text
                }
                None => String::new(),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn to_request(state: &ApiState, req: CompletionRequest) -> Result<(GenerateRequest, bool), ApiError> {
    refuse_unsupported(&req.other)?;
    if let Some(n) = req.n.filter(|n| *n != 1) {
        return Err(ApiError::bad("n", format!("invalid n: only 1 choice is supported, got {n}")));
    }
    let mut sampling = state.sampling(SamplingOverrides {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        max_tokens_field: Some(if req.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        }),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        top_k: req.top_k,
        min_p: req.min_p,
        repeat_penalty: req.repeat_penalty,
        repeat_last_n: req.repeat_last_n,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
    })?;
    sampling.stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    // Structured output: response_format, json_schema or grammar.
    sampling.grammar = super::structured::grammar_of(&req.other)?;
    sampling.validate()?;
    let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
    Ok((GenerateRequest { messages: convert_messages(req.messages)?, sampling }, include_usage))
}

#[derive(Serialize)]
struct UsageBody {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    /// Prompt tokens served from the instance's KV cache.
    cached_tokens: u32,
}

fn usage_body(u: &Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: PromptDetails { cached_tokens: u.cached_tokens },
    }
}

/// What a stateless request continues, for routing it to the slot whose
/// cache holds its prefix and finding its parked cache: the
/// `X-Conversation-Id` header, else the `user` field, else its opening (the
/// system prompt and the first question stay the same for a whole
/// conversation); within the namespace of the caller's API key.
fn cache_key(req: &HttpRequest, namespace: &str, user: Option<&Value>, messages: &[ChatMessage]) -> CacheKey {
    if let Some(id) = req.headers().get("x-conversation-id").map(|v| v.as_bytes()) {
        return CacheKey::new(namespace, id);
    }
    if let Some(user) = user.and_then(Value::as_str) {
        return CacheKey::new(namespace, user.as_bytes());
    }
    CacheKey::of_messages(namespace, messages)
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

async fn completions(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let body = body.into_inner();
    let namespace = auth.namespace.unwrap_or_default();
    let result = unless_client_gone(&http, completions_inner(&state, &http, &namespace, body, started)).await;
    if let Err(e) = &result {
        state.metrics.finished("chat_completions", started, Err(e));
    }
    result
}

#[tracing::instrument(name = "request", skip_all, fields(endpoint = "chat_completions"))]
async fn completions_inner(
    state: &web::Data<ApiState>,
    http: &HttpRequest,
    namespace: &str,
    req: CompletionRequest,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    let model = chat.pool().engine_info().model_name;
    let embed_model = chat.embedder().model_name().to_string();
    if req.model.as_deref().is_some_and(|m| !m.is_empty() && check_model(Some(m), &embed_model).is_ok()) {
        return Err(ApiError::bad(
            "model",
            format!("invalid model: {embed_model:?} is the embedding model (POST /v1/embeddings); chat with {model:?}"),
        ));
    }
    check_model(req.model.as_deref(), &model)?;
    let stream = req.stream;
    let user = req.other.get("user").cloned();
    let (request, include_usage) = to_request(state, req)?;
    let key = cache_key(http, namespace, user.as_ref(), &request.messages);
    let mut generation = chat.pool().generate_for(request, Some(key)).await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();

    if !stream {
        // An error returns to `completions`, which counts it once.
        let (text, done) = generation.collect_text().await?;
        state.metrics.finished("chat_completions", started, Ok(&done.usage));
        return Ok(HttpResponse::Ok().json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": finish_str(done.finish_reason),
            }],
            "usage": usage_body(&done.usage),
        })));
    }

    let (tx, rx) = mpsc::channel::<sse::Event>(64);
    let state = state.clone();
    actix::spawn(async move {
        // With `include_usage`, every chunk but the last carries `"usage": null`, as OpenAI's do.
        let chunk = |delta: Value, finish: Option<&str>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            });
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let send = |v: Value| tx.send(sse::Data::new(v.to_string()).into());
        if send(chunk(json!({ "role": "assistant", "content": "" }), None)).await.is_err() {
            return;
        }
        while let Some(event) = generation.next().await {
            match event {
                GenEvent::Token(t) => {
                    // The client left: dropping `generation` stops it within one token.
                    if send(chunk(json!({ "content": t }), None)).await.is_err() {
                        state.metrics.request("chat_completions", "cancelled", Some(started.elapsed()));
                        return;
                    }
                }
                GenEvent::Done(done) => {
                    state.metrics.finished("chat_completions", started, Ok(&done.usage));
                    let _ = send(chunk(json!({}), Some(finish_str(done.finish_reason)))).await;
                    if include_usage {
                        let last = json!({
                            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage_body(&done.usage),
                        });
                        let _ = send(last).await;
                    }
                    break;
                }
                GenEvent::Error(e) => {
                    let e = ApiError::from(e);
                    state.metrics.finished("chat_completions", started, Err(&e));
                    let _ = tx.send(sse::Data::new(e.body_json()).into()).await;
                    break;
                }
            }
        }
        let _ = tx.send(sse::Data::new("[DONE]").into()).await;
    });
    Ok(sse_response(rx))
}

async fn models(state: web::Data<ApiState>, _auth: Authorized) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let chat_model = chat.pool().engine_info().model_name;
    let embed_model = chat.embedder().model_name().to_string();
    // `purpose` tells the chat model from the embedding model (`/v1/embeddings` only).
    let entry = |id: String, purpose: &str| json!({ "id": id, "object": "model", "created": 0, "owned_by": "modelpool", "purpose": purpose });
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [entry(chat_model, "chat"), entry(embed_model, "embeddings")],
    })))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chat/completions", web::post().to(completions)).route("/v1/models", web::get().to(models));
}
