//! `POST /chat`: the simple chat endpoint, with memory.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::disconnect::after_admission;
use super::error::ApiError;
use super::kit::{resource, short_json, ApiState, Authorized, HEADERS_WHILE_QUEUED};
use super::metrics::Meter;
use super::pipeline::{self, Sampling};
use super::sse::{self, Frame};
use crate::chat::types::{ChatError, ChatEvent, ChatReply, SendMessage};
use crate::memory::prompt_builder::Recalled;
use crate::params::{FinishReason, Usage};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Not blank, no U+0000, at most `max_message_chars` characters.
    #[schema(pattern = "^[^\\u0000]*\\S[^\\u0000]*$")]
    pub message: String,
    #[schema(format = Uuid)]
    pub conversation_id: Option<String>,
    /// Namespace (user or tenant) of a new conversation.
    #[schema(pattern = "^[A-Za-z0-9_.@:-]{1,64}$")]
    pub namespace: Option<String>,
    /// The one set of sampling fields, as every route takes them.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Structured output, as on `/v1/chat/completions`: `{"type": "json_object"}`
    /// or `{"type": "json_schema", "json_schema": {"schema": {…}}}`.
    #[schema(value_type = Option<super::openapi::extras::ResponseFormat>)]
    pub response_format: Option<serde_json::Value>,
    #[serde(default)]
    pub stream: bool,
    /// Refused: a conversation here stores text turns, and a tool call's
    /// result comes from the client in a later request; tools are offered on
    /// `/v1/chat/completions` (with `X-Conversation-Id` to keep its cache warm).
    #[schema(schema_with = super::openapi::extras::null_only)]
    pub tools: Option<serde_json::Value>,
    #[schema(schema_with = super::openapi::extras::null_only)]
    pub tool_choice: Option<serde_json::Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ChatUsage)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    /// Prompt tokens served from the instance's KV cache (earlier turns).
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// From the request's arrival to the first generated token: memory
    /// (embedding, recall, prompt), queue wait and prompt processing.
    pub time_to_first_token_ms: f64,
    pub tokens_per_second: f64,
    pub queue_wait_ms: f64,
}

impl UsageBody {
    fn new(u: &Usage, started: Instant) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            time_to_first_token_ms: u
                .first_token_at
                .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1e3)
                .unwrap_or(0.0),
            tokens_per_second: u.tokens_per_second,
            queue_wait_ms: u.queue_wait_ms,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChatResponse<'a> {
    pub response: &'a str,
    pub conversation_id: String,
    pub message_id: u64,
    pub finish_reason: FinishReason,
    pub usage: UsageBody,
    pub recalled: &'a [Recalled],
    /// The model instance that generated the reply.
    pub instance: usize,
    /// The sequence slot of that instance.
    pub slot: usize,
    /// Time the turn waited on the conversation store, in milliseconds.
    pub store_ms: f64,
    /// Time the turn spent on memory work before its answer (embedding,
    /// recall, prompt, store), in milliseconds.
    pub memory_ms: f64,
}

fn response_body(r: &ChatReply, started: Instant) -> ChatResponse<'_> {
    ChatResponse {
        response: &r.reply,
        conversation_id: r.conversation_id.to_string(),
        message_id: r.message_id,
        finish_reason: r.finish_reason,
        usage: UsageBody::new(&r.usage, started),
        recalled: &r.recalled,
        instance: r.instance,
        slot: r.slot,
        store_ms: r.store_ms,
        memory_ms: r.memory_ms,
    }
}

/// The conversation `id`, if this caller may see it (else 404, as if it did not exist).
pub(crate) async fn visible_conversation(
    state: &ApiState,
    auth: &Authorized,
    id: uuid::Uuid,
) -> Result<crate::memory::store::Conversation, ApiError> {
    let conv = state.chat()?.conversation(&id).await?;
    if !auth.may_see(&conv.namespace) {
        return Err(ChatError::NotFound(id).into());
    }
    Ok(conv)
}

pub(crate) fn parse_conversation_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad("conversation_id", format!("invalid conversation_id: must be a UUID, got {raw:?}")))
}

/// One turn of a stored conversation: the message is stored, earlier
/// messages are recalled by meaning, and the reply is stored with it.
#[utoipa::path(
    post, path = "/chat", tag = "chat",
    params(("X-Conversation-Id" = Option<String>, Header, description = "The conversation to continue (as `conversation_id`)")),
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The reply (`stream: false`), or server-sent events `start` {conversation_id}, `token` {text}…, then `done` (this object) or `error`",
            content((ChatResponse = "application/json"), (super::openapi::bodies::SseEvent = "text/event-stream")), links(("get_conversation" = (operation_id = "get_conversation", parameters(("id" = "$response.body#/conversation_id")))), ("export_conversation" = (operation_id = "export_conversation", parameters(("id" = "$response.body#/conversation_id")))), ("delete_conversation" = (operation_id = "delete_conversation", parameters(("id" = "$response.body#/conversation_id")))))),
        (status = "default", description = "An error", body = super::error::ErrorBody),
    )
)]
async fn chat(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let mut body = body.into_inner();
    // A proxy routes on the X-Conversation-Id header; the body field works too.
    if let Some(header) = http.headers().get(CONVERSATION_HEADER) {
        let header = header.to_str().unwrap_or("").trim().to_string();
        match &body.conversation_id {
            Some(id) if *id != header => {
                let e = ApiError::bad(
                    "conversation_id",
                    format!("the X-Conversation-Id header ({header:?}) and the body's conversation_id ({id:?}) differ"),
                );
                return pipeline::metered(&state, &http, "chat", None, |_| async { Err(e) }).await;
            }
            _ => body.conversation_id = Some(header),
        }
    }
    let peer = super::disconnect::peer_of(&http);
    pipeline::metered(&state, &http, "chat", Some("message"), |meter| chat_inner(&state, &auth, body, peer, meter))
        .await
}

#[tracing::instrument(name = "request", skip_all, fields(endpoint = "chat"))]
async fn chat_inner(
    state: &web::Data<ApiState>,
    auth: &Authorized,
    req: ChatRequest,
    peer: Option<super::disconnect::PeerSocket>,
    meter: Meter,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    let namespace = auth.namespace(req.namespace)?;
    let conversation_id = match req.conversation_id.as_deref() {
        Some(raw) => Some(visible_conversation(state, auth, parse_conversation_id(raw)?).await?.id),
        None => None,
    };
    let mut sampling = pipeline::sampling(state, req.sampling, "max_tokens")?;
    if let Some(c) = req.response_format.as_ref().map(super::structured::response_format).transpose()?.flatten() {
        c.apply(&mut sampling);
    }
    for (field, v) in [("tools", &req.tools), ("tool_choice", &req.tool_choice)] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
            return Err(ApiError::bad(
                field,
                format!(
                    "invalid {field}: /chat does not call tools (it stores text turns); offer tools on \
                     POST /v1/chat/completions, got {}",
                    short_json(v)
                ),
            ));
        }
    }
    let msg =
        SendMessage { conversation_id, namespace, text: req.message, sampling: Some(sampling), client: auth.client };
    let handle = chat.clone();
    let mut admission = Box::pin(async move { handle.send(msg).await });
    if !req.stream {
        let reply = admission.await?.finish().await?;
        meter.ok(&reply.usage);
        state.metrics.chat_turn(&reply);
        return Ok(HttpResponse::Ok()
            .insert_header((CONVERSATION_HEADER, reply.conversation_id.to_string()))
            .insert_header((NODE_HEADER, state.settings.node.as_str()))
            .json(response_body(&reply, meter.started())));
    }

    // A turn still queued after a moment gets its answer's headers, then SSE
    // comments while it waits (clients and proxies see it is alive); a
    // refusal before that keeps its status. The `start` event names the
    // conversation; so does the header when it is known before the answer starts.
    let admitted = tokio::select! {
        admitted = &mut admission => Some(admitted?),
        _ = tokio::time::sleep(HEADERS_WHILE_QUEUED) => None,
    };
    let known = admitted.as_ref().map(|t| t.conversation_id).or(conversation_id);
    let mut routing = vec![(NODE_HEADER, state.settings.node.clone())];
    routing.extend(known.map(|id| (CONVERSATION_HEADER, id.to_string())));
    let state = state.clone();
    // The answer is a stream read straight from the turn: one event per
    // token; a client that leaves drops it, and with it the turn.
    let events = after_admission(admitted.map(Ok), admission, peer, move |admitted| {
        async_stream::stream! {
            let mut turn = match admitted {
                Ok(turn) => turn,
                Err(e) => {
                    let e = ApiError::from(e);
                    meter.fail(&e);
                    yield Frame::named("error", &e.body_json());
                    return;
                }
            };
            let start = serde_json::json!({ "conversation_id": turn.conversation_id.to_string() });
            yield Frame::named("start", &start.to_string());
            while let Some(event) = turn.next_event().await {
                match event {
                    ChatEvent::Token(t) => {
                        yield Frame::build(Some("token"), t.len() + 12, |b| {
                            b.extend_from_slice(b"{\"text\":");
                            sse::json_str(b, &t);
                            b.push(b'}');
                        });
                    }
                    ChatEvent::Done(reply) => {
                        meter.ok(&reply.usage);
                        state.metrics.chat_turn(&reply);
                        let body = serde_json::to_string(&response_body(&reply, meter.started())).expect("serialisable");
                        yield Frame::named("done", &body);
                        break;
                    }
                    ChatEvent::Error(e) => {
                        let e = ApiError::from(e);
                        meter.fail(&e);
                        yield Frame::named("error", &e.body_json());
                        break;
                    }
                }
            }
        }
    });
    let mut res = sse::response(events);
    for (name, value) in routing {
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&value) {
            res.headers_mut().insert(actix_web::http::header::HeaderName::from_static(name), v);
        }
    }
    Ok(res)
}

/// The conversation a `/chat` request continues or started (request and answer).
pub const CONVERSATION_HEADER: &str = "x-conversation-id";
/// The replica that answered (`server.node`).
pub const NODE_HEADER: &str = "x-modelpool-node";

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/chat", "POST").route(web::post().to(chat)));
}
