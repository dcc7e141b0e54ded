//! `POST /chat` (the simple chat endpoint, with memory) and
//! `GET /conversations` (newest first, paged), `GET`/`DELETE /conversations/{id}`.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::disconnect::unless_client_gone;
use super::{sse_response, ApiError, ApiState, Authorized, SamplingOverrides};
use crate::chat::actor::{ChatError, ChatEvent, ChatReply, SendMessage};
use crate::chat::turn::ImportMessage;
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::StoredMessage;
use crate::params::{FinishReason, Role, Usage};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub message: String,
    pub conversation_id: Option<String>,
    /// Namespace (user or tenant) of a new conversation.
    pub namespace: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Serialize)]
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

#[derive(Serialize)]
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
    }
}

/// The conversation `id`, if this caller may see it (else 404, as if it did not exist).
async fn visible_conversation(
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

async fn chat(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Json<ChatRequest>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
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
                state.metrics.finished("chat", started, Err(&e));
                return Err(e);
            }
            _ => body.conversation_id = Some(header),
        }
    }
    let result = unless_client_gone(&http, body.stream, chat_inner(&state, &auth, body, started)).await;
    // Every outcome but a started stream is counted here, once.
    if let Err(e) = &result {
        state.metrics.finished("chat", started, Err(e));
    }
    result
}

#[tracing::instrument(name = "request", skip_all, fields(endpoint = "chat"))]
async fn chat_inner(
    state: &web::Data<ApiState>,
    auth: &Authorized,
    req: ChatRequest,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    let namespace = auth.namespace(req.namespace)?;
    let conversation_id = match req.conversation_id.as_deref() {
        Some(raw) => Some(visible_conversation(state, auth, parse_conversation_id(raw)?).await?.id),
        None => None,
    };
    let sampling = state.sampling(SamplingOverrides {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        top_k: req.top_k,
        min_p: req.min_p,
        repeat_penalty: req.repeat_penalty,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        ..Default::default()
    })?;
    let msg = SendMessage { conversation_id, namespace, text: req.message, sampling: Some(sampling) };
    let mut turn = chat.send(msg).await?;
    if !req.stream {
        let reply = turn.finish().await?;
        state.metrics.finished("chat", started, Ok(&reply.usage));
        state.metrics.chat_store(reply.store_ms);
        return Ok(HttpResponse::Ok()
            .insert_header((CONVERSATION_HEADER, reply.conversation_id.to_string()))
            .insert_header((NODE_HEADER, state.settings.node.as_str()))
            .json(response_body(&reply, started)));
    }

    let (tx, rx) = mpsc::channel::<sse::Event>(64);
    let state = state.clone();
    let conversation_id = turn.conversation_id.to_string();
    let routing = [(CONVERSATION_HEADER, conversation_id.clone()), (NODE_HEADER, state.settings.node.clone())];
    actix::spawn(async move {
        let start = serde_json::json!({ "conversation_id": conversation_id });
        if tx.send(sse::Data::new(start.to_string()).event("start").into()).await.is_err() {
            return;
        }
        while let Some(event) = turn.next_event().await {
            let (out, last) = match event {
                ChatEvent::Token(t) => {
                    (sse::Data::new(serde_json::json!({ "text": t }).to_string()).event("token"), false)
                }
                ChatEvent::Done(reply) => {
                    state.metrics.finished("chat", started, Ok(&reply.usage));
                    state.metrics.chat_store(reply.store_ms);
                    state.metrics.chat_store(reply.store_ms);
                    let body = serde_json::to_string(&response_body(&reply, started)).expect("serialisable");
                    (sse::Data::new(body).event("done"), true)
                }
                ChatEvent::Error(e) => {
                    let e = ApiError::from(e);
                    state.metrics.finished("chat", started, Err(&e));
                    (sse::Data::new(e.body_json()).event("error"), true)
                }
            };
            // A client that left drops the receiver: dropping `turn` then stops the generation.
            if tx.send(out.into()).await.is_err() {
                state.metrics.request("chat", "cancelled", Some(started.elapsed()));
                break;
            }
            if last {
                break;
            }
        }
    });
    let mut res = sse_response(rx);
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub after: Option<u64>,
    pub limit: Option<usize>,
}

#[derive(Serialize)]
struct ConversationBody {
    conversation_id: String,
    namespace: String,
    created_at_ms: u64,
    messages: Vec<StoredMessage>,
    /// Pass as `after` for the next page; null at the end.
    next_after: Option<u64>,
}

async fn get_conversation(
    state: web::Data<ApiState>,
    auth: Authorized,
    id: web::Path<String>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let id = parse_conversation_id(&id)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad("limit", format!("invalid limit: must be between 1 and 1000, got {limit}")));
    }
    let conv = visible_conversation(&state, &auth, id).await?;
    let messages = chat.history(&id, q.after, limit + 1).await?;
    let more = messages.len() > limit;
    let messages: Vec<StoredMessage> = messages.into_iter().take(limit).collect();
    let next_after = if more { messages.last().map(|m| m.id) } else { None };
    Ok(HttpResponse::Ok().json(ConversationBody {
        conversation_id: id.to_string(),
        namespace: conv.namespace,
        created_at_ms: conv.created_at_ms,
        messages,
        next_after,
    }))
}

async fn delete_conversation(
    state: web::Data<ApiState>,
    auth: Authorized,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let id = visible_conversation(&state, &auth, parse_conversation_id(&id)?).await?.id;
    let removed = chat.delete(id).await?;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "conversation_id": id.to_string(), "deleted": true, "messages": removed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The `next_before` of the previous page.
    pub before: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Serialize)]
struct ConversationItem {
    conversation_id: String,
    /// The first message, on one line, cut at 60 characters.
    title: String,
    namespace: String,
    created_at_ms: u64,
}

/// A title from a conversation's first message.
fn title_of(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

/// The page cursor of a conversation: newest first, ties by id.
fn cursor_of(c: &crate::memory::store::Conversation) -> String {
    format!("{}_{}", c.created_at_ms, c.id)
}

fn parse_cursor(raw: &str) -> Result<(u64, uuid::Uuid), ApiError> {
    let bad =
        || ApiError::bad("before", format!("invalid before: pass the next_before of the previous page, got {raw:?}"));
    let (ms, id) = raw.split_once('_').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, uuid::Uuid::parse_str(id).map_err(|_| bad())?))
}

/// `GET /conversations`: the caller's conversations, newest first, paged.
async fn list_conversations(
    state: web::Data<ApiState>,
    auth: Authorized,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad("limit", format!("invalid limit: must be between 1 and 100, got {limit}")));
    }
    let before = q.before.as_deref().map(parse_cursor).transpose()?;
    let mut all: Vec<_> = chat.conversations().await?.into_iter().filter(|c| auth.may_see(&c.namespace)).collect();
    all.sort_by_key(|c| std::cmp::Reverse((c.created_at_ms, c.id)));
    let page: Vec<_> = all
        .into_iter()
        .filter(|c| before.is_none_or(|(ms, id)| (c.created_at_ms, c.id) < (ms, id)))
        .take(limit + 1)
        .collect();
    let next_before = (page.len() > limit).then(|| cursor_of(&page[limit - 1]));
    let mut items = Vec::with_capacity(limit);
    for c in page.into_iter().take(limit) {
        let first = chat.history(&c.id, None, 1).await?;
        let title = c.title.clone().unwrap_or_else(|| first.first().map(|m| title_of(&m.content)).unwrap_or_default());
        items.push(ConversationItem {
            conversation_id: c.id.to_string(),
            title,
            namespace: c.namespace,
            created_at_ms: c.created_at_ms,
        });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "conversations": items, "next_before": next_before })))
}

/// One conversation in the import/export format.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub messages: Vec<DocumentMessage>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentMessage {
    /// "user" or "assistant".
    pub role: String,
    pub content: String,
    /// Milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
}

fn is_ndjson(http: &HttpRequest) -> bool {
    let ct = http.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(
        ct.as_str(),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/x-jsonlines"
    )
}

/// `POST /conversations/import`: one conversation as JSON, or many as NDJSON
/// (one conversation a line). Each is stored all or nothing, with its
/// messages' embeddings; the answer names each new conversation.
async fn import_conversations(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let ndjson = is_ndjson(&http);
    let text = std::str::from_utf8(&body).map_err(|e| ApiError::bad("body", format!("the body is not UTF-8: {e}")))?;
    // Every line is parsed and checked before anything is stored.
    let mut documents = Vec::new();
    let lines: Vec<(usize, &str)> = if ndjson {
        text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l)).collect()
    } else {
        vec![(1, text)]
    };
    if lines.is_empty() {
        return Err(ApiError::bad("body", "the body holds no conversation".to_string()));
    }
    for (line, raw) in lines {
        let doc: ConversationDocument = serde_json::from_str(raw).map_err(|e| {
            let at = if ndjson { format!("line {line}: ") } else { String::new() };
            ApiError::bad(
                "body",
                format!(
                    "{at}expected {{\"namespace\"?, \"title\"?, \"messages\": [{{\"role\", \"content\", \"created_at\"?}}, …]}}: {e}"
                ),
            )
        })?;
        let namespace = auth.namespace(doc.namespace)?.unwrap_or_else(|| "default".to_string());
        let mut messages = Vec::with_capacity(doc.messages.len());
        for (i, m) in doc.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::bad(
                        "messages",
                        format!("invalid role of message {i}: must be \"user\" or \"assistant\", got {other:?}"),
                    ))
                }
            };
            messages.push(ImportMessage { role, content: m.content, created_at_ms: m.created_at });
        }
        documents.push((namespace, doc.title, messages));
    }
    let mut answers = Vec::with_capacity(documents.len());
    for (namespace, title, messages) in documents {
        let (conv, stored) = chat.import(&namespace, title, messages).await?;
        answers.push(serde_json::json!({ "conversation_id": conv.id.to_string(), "messages": stored.len() }));
    }
    Ok(if ndjson {
        HttpResponse::Ok().json(answers)
    } else {
        HttpResponse::Ok().json(answers.pop().expect("one conversation"))
    })
}

/// `GET /conversations/{id}/export`: the conversation in the import format.
async fn export_conversation(
    state: web::Data<ApiState>,
    auth: Authorized,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let conv = visible_conversation(&state, &auth, parse_conversation_id(&id)?).await?;
    let messages = chat.history(&conv.id, None, usize::MAX).await?;
    let title = conv.title.clone().or_else(|| messages.first().map(|m| title_of(&m.content)));
    let doc = ConversationDocument {
        namespace: Some(conv.namespace),
        title,
        messages: messages
            .into_iter()
            .map(|m| DocumentMessage {
                role: m.role.as_str().to_string(),
                content: m.content,
                created_at: Some(m.created_at_ms),
            })
            .collect(),
    };
    Ok(HttpResponse::Ok()
        .insert_header((
            actix_web::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"conversation-{}.json\"", conv.id),
        ))
        .json(doc))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.route("/chat", web::post().to(chat))
        .route("/conversations/import", web::post().to(import_conversations))
        .route("/conversations/{id}/export", web::get().to(export_conversation))
        .route("/conversations", web::get().to(list_conversations))
        .route("/conversations/{id}", web::get().to(get_conversation))
        .route("/conversations/{id}", web::delete().to(delete_conversation));
}
