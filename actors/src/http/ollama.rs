//! Ollama's API at `/api/*`, for the clients written against it: `chat` and
//! `generate` (NDJSON streaming by default), `embed` and the older
//! `embeddings`, `tags`, `show`, `ps`, `version`. The same pool, KV caches
//! and sampling as `/v1`; `options` map onto the same parameters, `format`
//! onto structured output. What would change the answer and cannot be
//! honoured (tools, images, raw prompts, templates, mirostat…) is a 400 that
//! names it; routes that manage models say this server serves the models it
//! was started with. Errors have Ollama's shape, `{"error": "…"}`.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::disconnect::unless_client_gone;
use super::metrics::Meter;
use super::openai::{check_model, short_json};
use super::{ApiError, ApiState, Authorized, SamplingOverrides};
use crate::engine::CacheKey;
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Role, SamplingParams, Usage};
use crate::pool::lease::GenEvent;

/// An Ollama error: its status, and `{"error": message}`.
fn ollama_error(e: ApiError) -> HttpResponse {
    let message = match &e {
        ApiError::Internal(_) => "internal server error".to_string(),
        other => other.to_string(),
    };
    let mut res = e.error_response();
    let status = res.status();
    let headers = std::mem::take(res.headers_mut());
    let mut out = HttpResponse::build(status).json(json!({ "error": message }));
    for (name, value) in headers.iter().filter(|(n, _)| n.as_str() == "retry-after") {
        out.headers_mut().insert(name.clone(), value.clone());
    }
    out
}

/// Runs a handler and gives its error Ollama's shape.
async fn reply(work: impl std::future::Future<Output = Result<HttpResponse, ApiError>>) -> HttpResponse {
    work.await.unwrap_or_else(ollama_error)
}

/// A generation route's answer: an error is counted here, once (a
/// generation counts itself when it ends), and given Ollama's shape.
async fn counted(
    meter: &Meter,
    work: impl std::future::Future<Output = Result<HttpResponse, ApiError>>,
) -> HttpResponse {
    meter.answer(work.await).unwrap_or_else(ollama_error)
}

/// `model` as Ollama clients write it: a name, maybe with `:latest`.
fn check_name(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    check_model(asked.map(|m| m.strip_suffix(":latest").unwrap_or(m)), served)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    pub images: Option<Vec<Value>>,
    pub tool_calls: Option<Value>,
    /// A `tool` message's tool.
    pub tool_name: Option<String>,
}

#[derive(Deserialize)]
pub struct ChatBody {
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub tools: Option<Value>,
    pub format: Option<Value>,
    pub options: Option<HashMap<String, Value>>,
    pub stream: Option<bool>,
    /// The model stays loaded whatever it says: accepted.
    pub keep_alive: Option<Value>,
    pub think: Option<Value>,
}

#[derive(Deserialize)]
pub struct GenerateBody {
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: String,
    pub system: Option<String>,
    pub suffix: Option<String>,
    pub template: Option<String>,
    pub context: Option<Vec<Value>>,
    pub images: Option<Vec<Value>>,
    pub format: Option<Value>,
    pub options: Option<HashMap<String, Value>>,
    pub stream: Option<bool>,
    pub raw: Option<bool>,
    pub keep_alive: Option<Value>,
    pub think: Option<Value>,
}

fn refuse(field: &str, rule: &str, got: &Value) -> ApiError {
    ApiError::bad(field, format!("invalid {field}: {rule}, got {}", short_json(got)))
}

/// Fields that would change the answer and are not honoured: present and
/// not empty or false is a 400 naming them.
fn refuse_set(field: &str, v: Option<&Value>, rule: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(other) => Err(refuse(field, rule, other)),
    }
}

/// `options` and `format` onto the sampling parameters; the flag says
/// `num_predict` < 0 (to the end of the context).
fn sampling_of(
    state: &ApiState,
    options: Option<&HashMap<String, Value>>,
    format: Option<&Value>,
) -> Result<(SamplingParams, bool), ApiError> {
    let empty = HashMap::new();
    let o = options.unwrap_or(&empty);
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| refuse(&format!("options.{key}"), "must be a number", v)),
        }
    };
    let whole = |key: &str| -> Result<Option<i64>, ApiError> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_i64().map(Some).ok_or_else(|| refuse(&format!("options.{key}"), "must be a whole number", v))
            }
        }
    };
    // Samplers this server does not run: only their neutral values pass.
    for (key, neutral) in [("mirostat", 0.0), ("tfs_z", 1.0), ("typical_p", 1.0)] {
        if let Some(v) = number(key)?.filter(|v| *v != neutral) {
            return Err(ApiError::bad(
                &format!("options.{key}"),
                format!("invalid options.{key}: not supported by this server (only {neutral}), got {v}"),
            ));
        }
    }
    let n_ctx = state.chat()?.pool().options().instance.n_ctx;
    if let Some(n) = whole("num_ctx")?.filter(|n| *n > n_ctx as i64) {
        return Err(ApiError::bad(
            "options.num_ctx",
            format!("invalid options.num_ctx: at most this server's context of n_ctx={n_ctx} tokens, got {n}"),
        ));
    }
    let num_predict = whole("num_predict")?;
    let to_the_end = num_predict.is_some_and(|n| n < 0);
    let mut s = state.sampling(SamplingOverrides {
        max_tokens: num_predict.filter(|n| *n >= 0),
        max_tokens_field: Some("options.num_predict"),
        temperature: number("temperature")?.map(|v| v as f32),
        top_p: number("top_p")?.map(|v| v as f32),
        seed: whole("seed")?,
        top_k: whole("top_k")?,
        min_p: number("min_p")?.map(|v| v as f32),
        repeat_penalty: number("repeat_penalty")?.map(|v| v as f32),
        repeat_last_n: whole("repeat_last_n")?,
        frequency_penalty: number("frequency_penalty")?.map(|v| v as f32),
        presence_penalty: number("presence_penalty")?.map(|v| v as f32),
    })?;
    s.stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(one)) => vec![one.clone()],
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| refuse("options.stop", "must be a string or an array of strings", v))?,
    };
    s.grammar = match format {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) if f.is_empty() => None,
        Some(Value::String(f)) if f == "json" => super::structured::response_format(&json!({ "type": "json_object" }))?,
        Some(schema @ Value::Object(_)) => Some(super::structured::schema_grammar(schema, "format")?),
        Some(other) => return Err(refuse("format", "must be \"json\" or a JSON schema object", other)),
    };
    Ok((s, to_the_end))
}

/// What Ollama reports about a generation, in nanoseconds.
fn stats(usage: &Usage, started: Instant) -> Value {
    let eval_ns = if usage.tokens_per_second > 0.0 {
        (usage.completion_tokens as f64 / usage.tokens_per_second * 1e9) as u64
    } else {
        0
    };
    json!({
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": (usage.time_to_first_token_ms * 1e6) as u64,
        "eval_count": usage.completion_tokens,
        "eval_duration": eval_ns,
    })
}

fn done_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Which shape a generation is answered in.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Generate,
}

impl Shape {
    /// One NDJSON object with `text` (a piece, or the whole reply).
    fn piece(self, model: &str, text: &str) -> Value {
        match self {
            Shape::Chat => json!({
                "model": model, "created_at": now_rfc3339(),
                "message": { "role": "assistant", "content": text }, "done": false,
            }),
            Shape::Generate => json!({ "model": model, "created_at": now_rfc3339(), "response": text, "done": false }),
        }
    }

    /// [`Self::piece`] as its NDJSON line, written straight into one buffer
    /// (a streamed token's only allocation here).
    fn piece_line(self, model: &str, text: &str) -> web::Bytes {
        use super::sse::json_str;
        let mut b = Vec::with_capacity(model.len() + text.len() + 112);
        b.extend_from_slice(b"{\"model\":");
        json_str(&mut b, model);
        b.extend_from_slice(b",\"created_at\":\"");
        // Formatting a date into a Vec cannot fail.
        let _ = time::OffsetDateTime::now_utc().format_into(&mut b, &time::format_description::well_known::Rfc3339);
        b.extend_from_slice(match self {
            Shape::Chat => b"\",\"message\":{\"role\":\"assistant\",\"content\":" as &[u8],
            Shape::Generate => b"\",\"response\":",
        });
        json_str(&mut b, text);
        b.extend_from_slice(match self {
            Shape::Chat => b"},\"done\":false}\n" as &[u8],
            Shape::Generate => b",\"done\":false}\n",
        });
        web::Bytes::from(b)
    }

    fn last(self, model: &str, text: &str, done: &Completion, started: Instant) -> Value {
        let mut v = self.piece(model, text);
        v["done"] = json!(true);
        v["done_reason"] = json!(done_reason(done.finish_reason));
        for (k, x) in stats(&done.usage, started).as_object().expect("object") {
            v[k] = x.clone();
        }
        v
    }
}

/// One generation as an Ollama route asks for it.
struct Job {
    messages: Vec<ChatMessage>,
    sampling: SamplingParams,
    /// `num_predict` < 0: up to the end of the context.
    to_the_end: bool,
    stream: bool,
    shape: Shape,
    /// The reply is read as tool calls or an answer ([`super::tools`]).
    with_tools: bool,
}

/// Generates and answers in the job's shape: NDJSON lines while it
/// streams, or one object.
async fn generate(
    state: &web::Data<ApiState>,
    http: &HttpRequest,
    namespace: &str,
    job: Job,
    meter: Meter,
) -> Result<HttpResponse, ApiError> {
    let started = meter.started();
    let Job { messages, mut sampling, to_the_end, stream, shape, with_tools } = job;
    let chat = state.chat()?;
    state.admit()?;
    let model = chat.pool().engine_info().model_name;
    if to_the_end {
        // num_predict < 0: up to the end of the context, as Ollama does.
        sampling.max_tokens = None;
    }
    let key = match http.headers().get("x-conversation-id") {
        Some(id) => CacheKey::new(namespace, id.as_bytes()),
        None => CacheKey::of_messages(namespace, &messages),
    };
    let mut generation =
        chat.pool().generate_for(GenerateRequest { messages, sampling, raw_prompt: None }, Some(key)).await?;
    if with_tools {
        // A call is known to be one only once it parses: the reply is read
        // whole, then sent as one object, or as its message and the last line.
        let (text, done) = generation.collect_text().await?;
        meter.ok(&done.usage);
        let mut message = json!({ "role": "assistant", "content": "" });
        let mut last = shape.last(&model, "", &done, started);
        match super::tools::parse_reply(&text) {
            super::tools::Reply::Calls(calls) => {
                message["tool_calls"] = calls.iter().map(super::tools::ToolCall::ollama).collect();
            }
            super::tools::Reply::Text(answer) => message["content"] = Value::from(answer),
        }
        if !stream {
            last["message"] = message;
            return Ok(HttpResponse::Ok().json(last));
        }
        let mut piece = shape.piece(&model, "");
        piece["message"] = message;
        let body = format!("{piece}\n{last}\n");
        return Ok(HttpResponse::Ok().content_type("application/x-ndjson").body(body));
    }
    if !stream {
        let (text, done) = generation.collect_text().await?;
        meter.ok(&done.usage);
        return Ok(HttpResponse::Ok().json(shape.last(&model, &text, &done, started)));
    }
    // NDJSON lines read straight from the sequence's channel, one per token;
    // a client that leaves drops the stream, and with it the generation.
    let body = async_stream::stream! {
        let line = |v: Value| Ok::<_, actix_web::Error>(web::Bytes::from(format!("{v}\n")));
        while let Some(event) = generation.next().await {
            match event {
                GenEvent::Token(t) => yield Ok(shape.piece_line(&model, &t)),
                GenEvent::Logprob(_) => {}
                GenEvent::Done(done) => {
                    meter.ok(&done.usage);
                    yield line(shape.last(&model, "", &done, started));
                    break;
                }
                GenEvent::Error(e) => {
                    let e = ApiError::from(e);
                    meter.fail(&e);
                    yield line(json!({ "error": e.to_string() }));
                    break;
                }
            }
        }
    };
    Ok(HttpResponse::Ok().content_type("application/x-ndjson").streaming(body))
}

async fn api_chat(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<ChatBody>,
) -> HttpResponse {
    let meter = Meter::new(state.metrics.clone(), "ollama", Instant::now());
    let work = async {
        let body = body.into_inner();
        let chat = state.chat()?;
        check_name(body.model.as_deref(), &chat.pool().engine_info().model_name)?;
        // Ollama has no tool_choice: the model calls a tool or answers.
        let tools = match &body.tools {
            Some(t) => super::tools::tools_of(&HashMap::from([("tools".to_string(), t.clone())]))?,
            None => None,
        };
        refuse_set("think", body.think.as_ref(), "this model does not think")?;
        let _ = body.keep_alive;
        if body.messages.is_empty() {
            // Ollama's way to load a model: it is loaded (no generation to count).
            meter.skip();
            let model = chat.pool().engine_info().model_name;
            return Ok(HttpResponse::Ok().json(json!({
                "model": model, "created_at": now_rfc3339(),
                "message": { "role": "assistant", "content": "" }, "done": true, "done_reason": "load",
            })));
        }
        let mut messages = Vec::with_capacity(body.messages.len());
        let mut call_names = HashMap::new();
        for (i, m) in body.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                // A tool's result is data the client fetched: a user turn.
                "tool" => Role::User,
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!("invalid messages[{i}].role: must be system, user, assistant or tool, got {other:?}"),
                    ))
                }
            };
            let images = m.images.map(Value::from);
            refuse_set(&format!("messages[{i}].images"), images.as_ref(), "images are not supported by this model")?;
            let content = match (m.role.as_str(), m.tool_calls.as_ref().filter(|c| !c.is_null())) {
                ("assistant", Some(calls)) => super::tools::assistant_text(i, m.content, calls, &mut call_names)?,
                (_, Some(calls)) => {
                    return Err(refuse(
                        &format!("messages[{i}].tool_calls"),
                        "only an assistant message makes calls",
                        calls,
                    ))
                }
                ("tool", None) => super::tools::tool_result_text(m.content, None, m.tool_name.as_deref(), &call_names),
                _ => m.content,
            };
            messages.push(ChatMessage::new(role, content));
        }
        let (mut sampling, to_the_end) = sampling_of(&state, body.options.as_ref(), body.format.as_ref())?;
        if let Some(tools) = &tools {
            if sampling.grammar.is_some() {
                return Err(refuse(
                    "format",
                    "a reply cannot both call tools and follow a format",
                    body.format.as_ref().unwrap_or(&Value::Null),
                ));
            }
            sampling.grammar = Some(tools.grammar());
            messages = super::openai::with_tool_instructions(messages, tools);
        }
        let namespace = auth.namespace.clone().unwrap_or_default();
        let job = Job {
            messages,
            sampling,
            to_the_end,
            stream: body.stream.unwrap_or(true),
            shape: Shape::Chat,
            with_tools: tools.is_some(),
        };
        unless_client_gone(&http, generate(&state, &http, &namespace, job, meter.clone())).await
    };
    counted(&meter, work).await
}

async fn api_generate(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<GenerateBody>,
) -> HttpResponse {
    let meter = Meter::new(state.metrics.clone(), "ollama", Instant::now());
    let work = async {
        let body = body.into_inner();
        let chat = state.chat()?;
        let model = chat.pool().engine_info().model_name;
        check_name(body.model.as_deref(), &model)?;
        let raw = body.raw.map(Value::from);
        refuse_set(
            "raw",
            raw.as_ref(),
            "raw prompts are not supported: the prompt goes through the model's chat template",
        )?;
        refuse_set("template", body.template.map(Value::from).as_ref(), "this server uses the model's own template")?;
        refuse_set("suffix", body.suffix.map(Value::from).as_ref(), "this model does not fill in the middle")?;
        refuse_set(
            "context",
            body.context.map(Value::from).as_ref(),
            "context is not supported: send the conversation to /api/chat",
        )?;
        refuse_set("images", body.images.map(Value::from).as_ref(), "images are not supported by this model")?;
        refuse_set("think", body.think.as_ref(), "this model does not think")?;
        let _ = body.keep_alive;
        if body.prompt.is_empty() {
            meter.skip();
            return Ok(HttpResponse::Ok().json(json!({
                "model": model, "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load",
            })));
        }
        let mut messages = Vec::new();
        if let Some(system) = body.system.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage::new(Role::System, system));
        }
        messages.push(ChatMessage::user(body.prompt));
        let (sampling, to_the_end) = sampling_of(&state, body.options.as_ref(), body.format.as_ref())?;
        let namespace = auth.namespace.clone().unwrap_or_default();
        let job = Job {
            messages,
            sampling,
            to_the_end,
            stream: body.stream.unwrap_or(true),
            shape: Shape::Generate,
            with_tools: false,
        };
        unless_client_gone(&http, generate(&state, &http, &namespace, job, meter.clone())).await
    };
    counted(&meter, work).await
}

#[derive(Deserialize)]
pub struct EmbedBody {
    pub model: Option<String>,
    /// `/api/embed`: a string or an array of strings.
    pub input: Option<Value>,
    /// `/api/embeddings` (the older route): one string.
    pub prompt: Option<String>,
    pub truncate: Option<bool>,
    pub dimensions: Option<i64>,
    pub options: Option<HashMap<String, Value>>,
    pub keep_alive: Option<Value>,
}

/// The embeddings of `texts`; with `truncate` (Ollama's default) a text
/// past the model's limit is cut to it, without it that is a 400.
async fn embed_texts(
    state: &ApiState,
    body: &EmbedBody,
    texts: Vec<String>,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    let embedder = chat.embedder();
    check_name(body.model.as_deref(), embedder.model_name())?;
    if let Some(d) = body.dimensions.filter(|d| *d != embedder.dim() as i64) {
        return Err(ApiError::bad(
            "dimensions",
            format!("invalid dimensions: this model has exactly {} dimensions, got {d}", embedder.dim()),
        ));
    }
    if texts.is_empty() || texts.len() > 256 {
        return Err(ApiError::bad("input", format!("invalid input: must hold 1 to 256 texts, got {}", texts.len())));
    }
    let limit = embedder.token_limit();
    let mut tokens = 0;
    for (index, t) in texts.iter().enumerate() {
        let n = embedder.count_tokens(t);
        if n > limit && body.truncate == Some(false) {
            return Err(crate::error::EngineError::InputTooLong { index, tokens: n, limit }.into());
        }
        tokens += n.min(limit);
    }
    Ok((embedder.embed(texts).await?, tokens))
}

async fn api_embed(state: web::Data<ApiState>, _auth: Authorized, body: web::Json<EmbedBody>) -> HttpResponse {
    let started = Instant::now();
    reply(async {
        let texts: Vec<String> = match &body.input {
            Some(Value::String(s)) => vec![s.clone()],
            Some(v @ Value::Array(_)) => serde_json::from_value(v.clone())
                .map_err(|_| refuse("input", "must be a string or an array of strings", v))?,
            Some(other) => return Err(refuse("input", "must be a string or an array of strings", other)),
            None => return Err(ApiError::bad("input", "invalid input: required, got nothing")),
        };
        let (vectors, tokens) = embed_texts(&state, &body, texts).await?;
        let model = state.chat()?.embedder().model_name().to_string();
        Ok(HttpResponse::Ok().json(json!({
            "model": model,
            "embeddings": vectors,
            "total_duration": started.elapsed().as_nanos() as u64,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        })))
    })
    .await
}

async fn api_embeddings(state: web::Data<ApiState>, _auth: Authorized, body: web::Json<EmbedBody>) -> HttpResponse {
    reply(async {
        let text =
            body.prompt.clone().ok_or_else(|| ApiError::bad("prompt", "invalid prompt: required, got nothing"))?;
        let (mut vectors, _) = embed_texts(&state, &body, vec![text]).await?;
        Ok(HttpResponse::Ok().json(json!({ "embedding": vectors.pop().unwrap_or_default() })))
    })
    .await
}

/// The served models as Ollama describes them.
fn described(state: &ApiState) -> Result<Vec<Value>, ApiError> {
    let chat = state.chat()?;
    let info = chat.pool().engine_info();
    let details = |name: &str, family: &str| {
        let quant = name.rsplit_once('.').map(|(_, q)| q.to_string()).unwrap_or_default();
        json!({ "parent_model": "", "format": "gguf", "family": family, "families": [family], "parameter_size": "", "quantization_level": quant })
    };
    let embed = chat.embedder().model_name().to_string();
    Ok(vec![
        json!({ "name": info.model_name, "model": info.model_name, "size": info.weights_bytes, "digest": "", "details": details(&info.model_name, "llama"), "purpose": "chat" }),
        json!({ "name": embed, "model": embed, "size": 0, "digest": "", "details": details(&embed, "bert"), "purpose": "embeddings" }),
    ])
}

async fn api_tags(state: web::Data<ApiState>, _auth: Authorized) -> HttpResponse {
    reply(async {
        let now = now_rfc3339();
        let models: Vec<Value> = described(&state)?
            .into_iter()
            .map(|mut m| {
                m["modified_at"] = json!(now);
                m
            })
            .collect();
        Ok(HttpResponse::Ok().json(json!({ "models": models })))
    })
    .await
}

/// Loaded models: both stay loaded for the life of the process.
async fn api_ps(state: web::Data<ApiState>, _auth: Authorized) -> HttpResponse {
    reply(async {
        let n_ctx = state.chat()?.pool().options().instance.n_ctx;
        let models: Vec<Value> = described(&state)?
            .into_iter()
            .map(|mut m| {
                m["expires_at"] = json!("9999-12-31T23:59:59Z");
                m["size_vram"] = json!(0);
                m["context_length"] = json!(n_ctx);
                m
            })
            .collect();
        Ok(HttpResponse::Ok().json(json!({ "models": models })))
    })
    .await
}

#[derive(Deserialize)]
pub struct ShowBody {
    pub model: Option<String>,
    pub name: Option<String>,
    pub verbose: Option<bool>,
}

async fn api_show(state: web::Data<ApiState>, _auth: Authorized, body: web::Json<ShowBody>) -> HttpResponse {
    reply(async {
        let asked = body.model.as_deref().or(body.name.as_deref()).unwrap_or("");
        let _ = body.verbose;
        let chat = state.chat()?;
        let info = chat.pool().engine_info();
        let embed = chat.embedder().model_name().to_string();
        let models = described(&state)?;
        let (model, capabilities, context) = if check_name(Some(asked), &info.model_name).is_ok() && !asked.is_empty() {
            (&models[0], json!(["completion", "tools"]), info.n_ctx_train)
        } else if check_name(Some(asked), &embed).is_ok() && !asked.is_empty() {
            (&models[1], json!(["embedding"]), 0)
        } else {
            return Err(ApiError::ModelNotFound(asked.chars().take(200).collect()));
        };
        Ok(HttpResponse::Ok().json(json!({
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": model["details"],
            "model_info": { "general.basename": model["name"], "context_length": context },
            "capabilities": capabilities,
            "modified_at": now_rfc3339(),
        })))
    })
    .await
}

async fn api_version() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// pull, push, create, copy, delete, blobs: this server does not manage models.
async fn api_manage(req: HttpRequest) -> HttpResponse {
    let route = req.path().to_string();
    ollama_error(ApiError::bad(
        "model",
        format!(
            "{route} is not available: this server serves the models it was started with (model and \
             embedding_model in its configuration); it does not pull, push, create, copy or delete models"
        ),
    ))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/chat", web::post().to(api_chat))
        .route("/api/generate", web::post().to(api_generate))
        .route("/api/embed", web::post().to(api_embed))
        .route("/api/embeddings", web::post().to(api_embeddings))
        .route("/api/tags", web::get().to(api_tags))
        .route("/api/ps", web::get().to(api_ps))
        .route("/api/show", web::post().to(api_show))
        .route("/api/version", web::get().to(api_version));
    for route in ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/{digest}"] {
        cfg.route(route, web::route().to(api_manage));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_line_is_the_piece_it_stands_for() {
        for shape in [Shape::Chat, Shape::Generate] {
            let text = "a \"quoted\"\nline é";
            let line = shape.piece_line("m\"odel", text);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&c| c == b'\n').count(), 1, "one line");
            let mut got: Value = serde_json::from_slice(&line).unwrap();
            let mut want = shape.piece("m\"odel", text);
            let at = got["created_at"].as_str().unwrap().to_string();
            assert!(at.len() >= 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z'), "{at}");
            got["created_at"] = Value::Null;
            want["created_at"] = Value::Null;
            assert_eq!(got, want);
        }
    }
}
