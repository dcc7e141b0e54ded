//! Ollama's API at `/api/*`, for the clients written against it: `chat` and
//! `generate` (NDJSON streaming by default), `embed` and the older
//! `embeddings`, `tags`, `show`, `ps`, `version`. The same pool, KV caches
//! and sampling as `/v1`; `options` map onto the same parameters, `format`
//! onto structured output. What would change the answer and cannot be
//! honoured (tools, images, raw prompts, templates, mirostat…) is a 400 that
//! names it; routes that manage models say this server serves the models it
//! was started with. Errors have Ollama's shape, `{"error": "…"}`.

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::kit::{ApiState, Authorized};
use super::metrics::Meter;
use super::pipeline;
use crate::engine::CacheKey;
use crate::params::{ChatMessage, GenerateRequest, Role, SamplingParams};
use crate::pool::lease::GenEvent;

pub mod embed;
pub mod models;
mod reply;
pub mod request;

use reply::{now_rfc3339, ollama_error, Shape};
use request::{check_name, refuse, refuse_set, sampling_of, ChatBody, GenerateBody};

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
    /// Who asks ([`Authorized::client`]).
    client: Option<u64>,
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
    let Job { messages, mut sampling, to_the_end, stream, shape, with_tools, client } = job;
    let chat = state.chat()?;
    let model = chat.pool().engine_info().model_name;
    if to_the_end {
        // num_predict < 0: up to the end of the context, as Ollama does.
        sampling.max_tokens = None;
    }
    let key = match http.headers().get("x-conversation-id") {
        Some(id) => CacheKey::new(namespace, id.as_bytes()),
        None => CacheKey::of_messages(namespace, &messages),
    };
    let request = pipeline::prepare(state, GenerateRequest { messages, sampling, raw_prompt: None }).await?;
    let mut generation = chat.pool().run_as(request, Some(key), client).await?;
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

/// Ollama's chat: NDJSON lines by default, one object with `stream: false`.
#[utoipa::path(post, path = "/api/chat", tag = "ollama", request_body = ChatBody,
    responses((status = 200, description = "The reply, or its NDJSON stream (one such object a line, the last with `done: true`)",
        content((crate::http::openapi::bodies::OllamaChatReply = "application/json"), (crate::http::openapi::bodies::OllamaChatLine = "application/x-ndjson"))), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
async fn api_chat(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<ChatBody>,
) -> HttpResponse {
    let work = |meter: Meter| async {
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
        // Checked before anything is answered, a load request's too.
        let (mut sampling, to_the_end) = sampling_of(&state, body.options.as_ref(), body.format.as_ref())?;
        if body.messages.is_empty() {
            // Ollama's way to load a model: it is loaded (no generation to
            // count), once the request's options are within their bounds.
            sampling.validate()?;
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
            let role = super::tools::message_role(i, &m.role, false)?;
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
        if let Some(tools) = &tools {
            if sampling.is_constrained() {
                return Err(refuse(
                    "format",
                    "a reply cannot both call tools and follow a format",
                    body.format.as_ref().unwrap_or(&Value::Null),
                ));
            }
            tools.grammar().apply(&mut sampling);
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
            client: auth.client,
        };
        generate(&state, &http, &namespace, job, meter).await
    };
    pipeline::metered(&state, &http, "ollama", None, work).await.unwrap_or_else(ollama_error)
}

/// Ollama's completion of a prompt.
#[utoipa::path(post, path = "/api/generate", tag = "ollama", request_body = GenerateBody,
    responses((status = 200, description = "The reply, or its NDJSON stream (one such object a line, the last with `done: true`)",
        content((crate::http::openapi::bodies::OllamaGenerateReply = "application/json"), (crate::http::openapi::bodies::OllamaGenerateLine = "application/x-ndjson"))), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
async fn api_generate(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<GenerateBody>,
) -> HttpResponse {
    let work = |meter: Meter| async {
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
        let (sampling, to_the_end) = sampling_of(&state, body.options.as_ref(), body.format.as_ref())?;
        if body.prompt.is_empty() {
            sampling.validate()?;
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
        let namespace = auth.namespace.clone().unwrap_or_default();
        let job = Job {
            messages,
            sampling,
            to_the_end,
            stream: body.stream.unwrap_or(true),
            shape: Shape::Generate,
            with_tools: false,
            client: auth.client,
        };
        generate(&state, &http, &namespace, job, meter).await
    };
    pipeline::metered(&state, &http, "ollama", None, work).await.unwrap_or_else(ollama_error)
}

/// Ollama's routes; `limit`: the largest body, in bytes.
pub fn register(limit: usize) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        // Ollama reads a body as JSON whatever its Content-Type says, and
        // clients rely on it (litellm sends none); errors in Ollama's shape.
        let json =
            web::JsonConfig::default().limit(limit).content_type_required(false).content_type(|_| true).error_handler(
                move |err, _| {
                    let e = crate::http::kit::body_error(err, limit);
                    actix_web::error::InternalError::from_response(e.clone(), ollama_error(e)).into()
                },
            );
        let at = |path, allow| crate::http::kit::resource(path, allow).app_data(json.clone());
        cfg.service(at("/api/chat", "POST").route(web::post().to(api_chat)))
            .service(at("/api/generate", "POST").route(web::post().to(api_generate)))
            .service(at("/api/embed", "POST").route(web::post().to(embed::api_embed)))
            .service(at("/api/embeddings", "POST").route(web::post().to(embed::api_embeddings)))
            .service(at("/api/tags", "GET").route(web::get().to(models::api_tags)))
            .service(at("/api/ps", "GET").route(web::get().to(models::api_ps)))
            .service(at("/api/show", "POST").route(web::post().to(models::api_show)))
            .service(at("/api/version", "GET").route(web::get().to(models::api_version)));
        // Ollama's methods for managing models: each answers that this server does not.
        for (route, allow) in [
            ("/api/pull", "POST"),
            ("/api/push", "POST"),
            ("/api/create", "POST"),
            ("/api/copy", "POST"),
            ("/api/delete", "DELETE"),
            ("/api/blobs/{digest}", "HEAD, POST"),
        ] {
            let mut r = at(route, allow);
            for method in allow.split(", ") {
                let method = actix_web::http::Method::from_bytes(method.as_bytes()).expect("a method");
                r = r.route(web::method(method).to(models::api_manage));
            }
            cfg.service(r);
        }
    }
}
