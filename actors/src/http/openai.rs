//! OpenAI-compatible `POST /v1/chat/completions` (stateless: the client sends
//! the conversation), `POST /v1/completions` and `GET /v1/models`: the
//! requests, checked; their answers are written by [`super::openai_reply`].

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::disconnect::peer_of;
use super::error::ApiError;
use super::kit::{check_model, de_whole, short_json, whole, ApiState, Authorized};
use super::openai_reply::{generate, Delivery, Route};
use super::pipeline::{self, Sampling};
use crate::engine::CacheKey;
use crate::params::{ChatMessage, GenerateRequest, RawPrompt, Role};

/// `content` as a string or as an array of `{"type": "text", "text": ...}` parts.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Part {
    /// Only `text` parts are read (others are refused).
    #[serde(rename = "type")]
    #[schema(pattern = "^text$")]
    pub kind: String,
    #[schema(required = true, value_type = String)]
    pub text: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// `system`, `developer` (as system), `user`, `assistant` or `tool`.
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    pub role: String,
    pub content: Option<Content>,
    /// An assistant message's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    pub tool_calls: Option<Value>,
    /// A `tool` message's answer to this call.
    pub tool_call_id: Option<String>,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What `/v1/chat/completions` and `/v1/completions` add to the one set of
/// sampling fields ([`Sampling`]): OpenAI's name for `max_tokens`, `n`, and
/// how the answer is delivered.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct SamplingFields {
    #[serde(flatten)]
    pub sampling: Sampling,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "de_whole")]
    pub max_completion_tokens: Option<i64>,
    #[serde(default, deserialize_with = "de_whole")]
    #[schema(schema_with = super::openapi::extras::one)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    // OpenAI's other fields and llama-server's, read by name: each honoured,
    // refused unless neutral, or ignored (the document's `ChatExtras`);
    // a field no documentation lists is ignored.
    #[serde(flatten)]
    #[schema(value_type = super::openapi::extras::ChatExtras)]
    pub other: HashMap<String, Value>,
}

/// `POST /v1/completions`: a prompt the client wrote whole (no chat template).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct TextCompletionRequest {
    pub model: Option<String>,
    #[schema(value_type = super::openapi::extras::Prompt)]
    pub prompt: Value,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    #[schema(value_type = super::openapi::extras::TextExtras)]
    pub other: HashMap<String, Value>,
}

/// Refuses the OpenAI options this server cannot honour, naming each
/// (tools are read by [`super::tools`] on the chat route; a text completion has none).
fn refuse_unsupported(other: &HashMap<String, Value>, route: Route) -> Result<(), ApiError> {
    let unsupported = |field: &str, got: &Value| {
        Err(ApiError::bad(field, format!("invalid {field}: not supported by this server, got {}", short_json(got))))
    };
    let text = matches!(route, Route::Text);
    for (field, v) in other {
        match field.as_str() {
            "tools" | "functions" if text && !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) => {
                return unsupported(field, v)
            }
            "tool_choice" | "function_call" | "parallel_tool_calls"
                if text && !v.is_null() && v != "none" && v != "auto" =>
            {
                return unsupported(field, v)
            }
            "echo" if !v.is_null() && v.as_bool() != Some(false) => return unsupported(field, v),
            "suffix" if v.as_str().is_some_and(|s| !s.is_empty()) || !(v.is_null() || v.is_string()) => {
                return unsupported(field, v)
            }
            "best_of" if !v.is_null() && whole(v) != Some(1) => return unsupported(field, v),
            "logit_bias" if !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()) => {
                return unsupported(field, v)
            }
            // Cache keys: text, or nothing.
            "user" | "prompt_cache_key" if !(v.is_null() || v.is_string()) => {
                return Err(ApiError::bad(field, format!("invalid {field}: must be a string, got {}", short_json(v))))
            }
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
    let set = || match v {
        Value::String(s) => !s.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Bool(b) => *b,
        _ => true,
    };
    match field {
        // What to sample with, or what to add to the prompt or the answer.
        "samplers" | "lora" | "response_fields" | "chat_template_kwargs" => set(),
        // Any object asks for them, `{}` too.
        "audio" | "web_search_options" => true,
        "return_tokens" | "timings_per_token" | "return_progress" | "post_sampling_probs" => set(),
        "modalities" => v != &json!(["text"]),
        "verbosity" => v != "medium",
        "reasoning_format" => v != "none",
        "n_indent" | "min_keep" | "t_max_predict_ms" => number(0.0),
        "mirostat" | "n_probs" | "dry_multiplier" | "xtc_probability" | "dynatemp_range" | "top_n_sigma" => {
            // top_n_sigma: −1 is off in llama-server.
            number(0.0) && !(field == "top_n_sigma" && v.as_f64() == Some(-1.0))
        }
        "typical_p" => number(1.0),
        "ignore_eos" => v.as_bool() != Some(false),
        _ => false,
    }
}

/// The request's messages as the model reads them: an assistant's tool
/// calls and the tools' results in the generic JSON form ([`super::tools`]).
fn convert_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "invalid messages: must contain at least one message, got []"));
    }
    let mut call_names = HashMap::new();
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = super::tools::message_role(i, &m.role, true)?;
            if m.tool_calls.as_ref().is_some_and(|c| !c.is_null()) && m.role != "assistant" {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_calls"),
                    format!("invalid messages[{i}].tool_calls: only an assistant message makes calls, got role {:?}", m.role),
                ));
            }
            if m.tool_call_id.is_some() && m.role != "tool" {
                return Err(ApiError::bad(
                    &format!("messages[{i}].tool_call_id"),
                    format!("invalid messages[{i}].tool_call_id: only a tool message answers a call, got role {:?}", m.role),
                ));
            }
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
            let content = match (m.role.as_str(), &m.tool_calls) {
                ("assistant", Some(calls)) if !calls.is_null() => {
                    super::tools::assistant_text(i, content, calls, &mut call_names)?
                }
                ("tool", _) => super::tools::tool_result_text(content, m.tool_call_id.as_deref(), None, &call_names),
                _ => content,
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Puts the tools' instructions into the system message (the first one,
/// or a new one before the conversation).
pub(super) fn with_tool_instructions(mut messages: Vec<ChatMessage>, tools: &super::tools::Tools) -> Vec<ChatMessage> {
    let text = tools.instructions();
    match messages.first_mut() {
        Some(first) if first.role == Role::System => {
            first.content = if first.content.is_empty() { text } else { format!("{}\n\n{text}", first.content) };
        }
        _ => messages.insert(0, ChatMessage::system(text)),
    }
    messages
}

/// The log-probabilities a request asks for: on chat completions
/// `logprobs: true` with `top_logprobs` alternatives (0 to 20); on
/// completions `logprobs: n` alternatives.
fn logprobs_of(other: &HashMap<String, Value>, route: Route) -> Result<Option<u32>, ApiError> {
    let logprobs = other.get("logprobs").filter(|v| !v.is_null());
    let top = other.get("top_logprobs").filter(|v| !v.is_null());
    let count = |field: &str, v: &Value| match whole(v) {
        Some(n) if (0..=crate::params::MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as u32),
        _ => Err(ApiError::bad(field, format!("invalid {field}: must be between 0 and 20, got {}", short_json(v)))),
    };
    match route {
        Route::Chat => {
            let on = match logprobs {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::bad("logprobs", format!("invalid logprobs: must be true or false, got {}", short_json(v)))
                })?,
            };
            match (on, top) {
                (false, Some(v)) if whole(v) != Some(0) => Err(ApiError::bad(
                    "top_logprobs",
                    format!("invalid top_logprobs: needs logprobs: true, got {}", short_json(v)),
                )),
                (false, _) => Ok(None),
                (true, None) => Ok(Some(0)),
                (true, Some(v)) => count("top_logprobs", v).map(Some),
            }
        }
        Route::Text => match (logprobs, top) {
            (_, Some(v)) => Err(ApiError::bad(
                "top_logprobs",
                format!("invalid top_logprobs: /v1/completions takes logprobs: n, got {}", short_json(v)),
            )),
            (None, None) => Ok(None),
            (Some(v), None) => count("logprobs", v).map(Some),
        },
    }
}

/// The sampling parameters of either route's request (structured output
/// included), and how its answer is delivered.
fn sampling_of(
    state: &ApiState,
    f: SamplingFields,
    other: &HashMap<String, Value>,
    route: Route,
) -> Result<(crate::params::SamplingParams, Delivery), ApiError> {
    refuse_unsupported(other, route)?;
    let logprobs = logprobs_of(other, route)?;
    if let Some(n) = f.n.filter(|n| *n != 1) {
        return Err(ApiError::bad("n", format!("invalid n: only 1 choice is supported, got {n}")));
    }
    // llama-server's n_predict: max_tokens by another name; -1 to the end of the context.
    let n_predict = match other.get("n_predict") {
        None | Some(Value::Null) => None,
        Some(v) => Some(whole(v).filter(|n| *n == -1 || *n >= 1).ok_or_else(|| {
            ApiError::bad(
                "n_predict",
                format!(
                    "invalid n_predict: must be -1 (to the end of the context) or at least 1, got {}",
                    short_json(v)
                ),
            )
        })?),
    };
    let mut fields = f.sampling;
    let max_tokens_field = match (f.max_completion_tokens, fields.max_tokens, n_predict) {
        (Some(n), _, _) => {
            fields.max_tokens = Some(n);
            "max_completion_tokens"
        }
        (None, Some(_), _) => "max_tokens",
        (None, None, Some(n)) if n >= 0 => {
            fields.max_tokens = Some(n);
            "n_predict"
        }
        _ => "max_tokens",
    };
    let given = fields.max_tokens.is_some();
    let mut sampling = pipeline::sampling(state, fields, max_tokens_field)?;
    if !given && n_predict == Some(-1) {
        sampling.max_tokens = None;
    }
    // Structured output: response_format, json_schema or grammar.
    if let Some(constraint) = super::structured::grammar_of(other)? {
        constraint.apply(&mut sampling);
    }
    sampling.logprobs = logprobs;
    let include_usage = f.stream_options.map(|o| o.include_usage).unwrap_or(false);
    Ok((sampling, Delivery { stream: f.stream, include_usage }))
}

/// A `/v1/completions` prompt: a string, or token ids of the served model's
/// vocabulary (as llama-server takes them), or an array of one of those.
fn raw_prompt(prompt: Value) -> Result<RawPrompt, ApiError> {
    let bad =
        |rule: &str, got: &Value| ApiError::bad("prompt", format!("invalid prompt: {rule}, got {}", short_json(got)));
    let ids =
        |a: &[Value]| -> Option<Vec<i32>> { a.iter().map(|v| whole(v).and_then(|n| i32::try_from(n).ok())).collect() };
    let one = match &prompt {
        Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => &a[0],
        Value::Array(a) if a.len() > 1 && a.iter().all(|v| v.is_string() || v.is_array()) => {
            return Err(bad("one prompt per request (send several requests; they are batched)", &prompt))
        }
        other => other,
    };
    let text = match one {
        Value::String(s) => s.clone(),
        Value::Array(a) if !a.is_empty() => match ids(a) {
            Some(ids) => return Ok(RawPrompt::Tokens(ids)),
            None => return Err(bad("token ids must be whole numbers of the model's vocabulary", one)),
        },
        Value::Array(_) => return Err(bad("must not be empty", &prompt)),
        other => return Err(bad("must be a string or an array of token ids", other)),
    };
    if text.is_empty() {
        return Err(bad("must not be empty", &prompt));
    }
    if text.contains('\0') {
        return Err(bad("must not contain the character U+0000 (NUL)", &json!("…")));
    }
    Ok(RawPrompt::Text(text))
}

/// What a stateless request continues, for routing it to the slot whose
/// cache holds its prefix and finding its parked cache: the
/// `X-Conversation-Id` header, else OpenAI's `prompt_cache_key`, else the
/// `user` field, else its opening (the system prompt and the first question
/// stay the same for a whole conversation); within the namespace of the
/// caller's API key.
fn cache_key(req: &HttpRequest, namespace: &str, other: &HashMap<String, Value>, messages: &[ChatMessage]) -> CacheKey {
    if let Some(id) = req.headers().get("x-conversation-id").map(|v| v.as_bytes()) {
        return CacheKey::new(namespace, id);
    }
    if let Some(key) = other.get("prompt_cache_key").and_then(Value::as_str).filter(|k| !k.is_empty()) {
        return CacheKey::new(namespace, key.as_bytes());
    }
    if let Some(user) = other.get("user").and_then(Value::as_str) {
        return CacheKey::new(namespace, user.as_bytes());
    }
    CacheKey::of_messages(namespace, messages)
}

/// OpenAI's chat completions, stateless: the client sends the conversation.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    params(("X-Conversation-Id" = Option<String>, Header, description = "Keys the conversation's KV cache")),
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` server-sent `chat.completion.chunk` events ending `data: [DONE]`",
            content((super::openapi::bodies::ChatCompletion = "application/json"), (super::openapi::bodies::SseEvent = "text/event-stream"))),
        (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn chat_completions(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let (namespace, client) = (auth.namespace.unwrap_or_default(), auth.client);
    pipeline::metered(&state, &http, Route::Chat.endpoint(), None, |meter| async {
        check_models(&state, req.model.as_deref())?;
        let (mut sampling, delivery) = sampling_of(&state, req.sampling, &req.other, Route::Chat)?;
        let tools = super::tools::tools_of(&req.other)?;
        let mut messages = convert_messages(req.messages)?;
        // The cache key is taken before the tools' instructions go in: a
        // conversation keeps its key whichever tools a turn offers.
        let key = cache_key(&http, &namespace, &req.other, &messages);
        if let Some(tools) = &tools {
            if sampling.is_constrained() {
                return Err(ApiError::bad(
                    "tool_choice",
                    "invalid tool_choice: a reply cannot both call tools and follow response_format, json_schema or \
                     grammar; send tool_choice \"none\" or drop the format",
                ));
            }
            tools.grammar().apply(&mut sampling);
            messages = with_tool_instructions(messages, tools);
        }
        let request = GenerateRequest { messages, sampling, raw_prompt: None };
        generate(&state, request, key, delivery, Route::Chat, tools.is_some(), peer_of(&http), client, meter).await
    })
    .await
}

/// OpenAI's completions: a prompt the client wrote whole (no chat template).
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    params(("X-Conversation-Id" = Option<String>, Header, description = "Keys the prompt's KV cache")),
    request_body = TextCompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` server-sent `text_completion` events ending `data: [DONE]`",
            content((super::openapi::bodies::TextCompletion = "application/json"), (super::openapi::bodies::SseEvent = "text/event-stream"))),
        (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn text_completions(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<TextCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let (namespace, client) = (auth.namespace.unwrap_or_default(), auth.client);
    pipeline::metered(&state, &http, Route::Text.endpoint(), Some("prompt"), |meter| async {
        check_models(&state, req.model.as_deref())?;
        let (sampling, delivery) = sampling_of(&state, req.sampling, &req.other, Route::Text)?;
        let prompt = raw_prompt(req.prompt)?;
        // Prompts that share their opening share a cache: the first 256 bytes name it.
        let opening: Vec<u8> = match &prompt {
            RawPrompt::Text(text) => text.bytes().take(256).collect(),
            RawPrompt::Tokens(ids) => ids.iter().take(64).flat_map(|id| id.to_le_bytes()).collect(),
        };
        let named = req.other.get("prompt_cache_key").and_then(Value::as_str).filter(|k| !k.is_empty());
        let key = match (http.headers().get("x-conversation-id"), named) {
            (Some(id), _) => CacheKey::new(&namespace, id.as_bytes()),
            (None, Some(name)) => CacheKey::new(&namespace, name.as_bytes()),
            (None, None) => CacheKey::new(&namespace, &opening),
        };
        let request = GenerateRequest { messages: Vec::new(), sampling, raw_prompt: Some(prompt) };
        generate(&state, request, key, delivery, Route::Text, false, peer_of(&http), client, meter).await
    })
    .await
}

/// The request's `model`: the served chat model (the embedding model is named as such).
fn check_models(state: &ApiState, asked: Option<&str>) -> Result<(), ApiError> {
    let chat = state.chat()?;
    let model = chat.pool().engine_info().model_name;
    let embed_model = chat.embedder().model_name().to_string();
    if asked.is_some_and(|m| !m.is_empty() && check_model(Some(m), &embed_model).is_ok()) {
        return Err(ApiError::bad(
            "model",
            format!("invalid model: {embed_model:?} is the embedding model (POST /v1/embeddings); chat with {model:?}"),
        ));
    }
    check_model(asked, &model)
}

/// A served model, as OpenAI lists one.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ModelEntry {
    /// The GGUF file's stem.
    id: String,
    /// Always `model`.
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// `chat`, or `embeddings` (`/v1/embeddings` only).
    purpose: &'static str,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ModelList {
    /// Always `list`.
    object: &'static str,
    data: [ModelEntry; 2],
}

/// The served models: the chat model and the embedding model, told apart by `purpose`.
fn model_entries(state: &ApiState) -> Result<[ModelEntry; 2], ApiError> {
    let chat = state.chat()?;
    let chat_model = chat.pool().engine_info().model_name;
    let embed_model = chat.embedder().model_name().to_string();
    let entry = |id: String, purpose| ModelEntry { id, object: "model", created: 0, owned_by: "modelpool", purpose };
    Ok([entry(chat_model, "chat"), entry(embed_model, "embeddings")])
}

/// The chat model and the embedding model.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn models(state: web::Data<ApiState>, _auth: Authorized) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(ModelList { object: "list", data: model_entries(&state)? }))
}

/// One served model (its id, or its id without the last `.suffix`), else 404 `model_not_found`.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "A model id from GET /v1/models")),
    responses((status = 200, body = ModelEntry), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn model(state: web::Data<ApiState>, _auth: Authorized, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let [chat, embed] = model_entries(&state)?;
    match [chat, embed].into_iter().find(|e| check_model(Some(id.as_str()), &e.id).is_ok()) {
        Some(entry) => Ok(HttpResponse::Ok().json(entry)),
        None => Err(ApiError::ModelNotFound(id.chars().take(200).collect())),
    }
}

pub fn register(cfg: &mut web::ServiceConfig) {
    use super::kit::resource;
    cfg.service(resource("/v1/chat/completions", "POST").route(web::post().to(chat_completions)))
        .service(resource("/v1/completions", "POST").route(web::post().to(text_completions)))
        .service(resource("/v1/models", "GET").route(web::get().to(models)))
        .service(resource("/v1/models/{id:.+}", "GET").route(web::get().to(model)));
}
