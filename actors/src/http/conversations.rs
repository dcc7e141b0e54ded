//! The stored conversations: `GET /conversations` (newest first, paged),
//! `GET`/`DELETE /conversations/{id}`, and import/export in one JSON format
//! (`POST /conversations/import`, `GET /conversations/{id}/export`).
//! `DELETE` also takes the id a stateless client gave its requests
//! (`X-Conversation-Id`, `prompt_cache_key`, `user`): their KV cache is kept
//! under it, and has no other way to be deleted.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::chat::{parse_conversation_id, visible_conversation};
use super::error::ApiError;
use super::kit::{ApiState, Authorized};
use crate::chat::import::ImportMessage;
use crate::chat::types::ChatError;
use crate::engine::CacheKey;
use crate::memory::store::StoredMessage;
use crate::params::Role;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next_after` of the previous page; empty: from the start.
    #[serde(default, deserialize_with = "super::kit::de_query")]
    #[param(schema_with = super::openapi::extras::message_id_or_empty)]
    pub after: Option<u64>,
    /// 1–1000, default 100; empty: the default.
    #[param(schema_with = super::openapi::extras::limit_1000)]
    #[serde(default, deserialize_with = "super::kit::de_query")]
    pub limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ConversationBody {
    conversation_id: String,
    namespace: String,
    created_at_ms: u64,
    messages: Vec<StoredMessage>,
    /// Pass as `after` for the next page; null at the end.
    next_after: Option<u64>,
}

/// A conversation's messages in order, paged.
#[utoipa::path(get, path = "/conversations/{id}", tag = "conversations", operation_id = "get_conversation",
    params(("id" = String, Path, description = "The conversation's id (a UUID)"), PageQuery),
    responses((status = 200, body = ConversationBody), (status = "default", description = "An error", body = super::error::ErrorBody)))]
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
    let limit = limit as usize;
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

/// `DELETE /conversations/{id}`: the KV cache that stateless requests keyed
/// by `id` left in the caller's namespace (the key `X-Conversation-Id: id` or
/// `prompt_cache_key: id` gives them: memory and disk, and a write of it
/// still queued never lands), then the stored conversation `id` names, if
/// any, with its messages, vectors and cache. A stored conversation deleted:
/// 200 with what was deleted; only a cache: 204; neither: 404, as for any
/// unknown id. The cache goes first and whatever else happens: it may exist
/// only on disk, and under an id that is no UUID.
#[utoipa::path(delete, path = "/conversations/{id}", tag = "conversations", operation_id = "delete_conversation",
    params(("id" = String, Path, description = "A conversation's id, or the id stateless requests keyed their cache by")),
    responses((status = 200, description = "The stored conversation was deleted", body = Deleted),
        (status = 204, description = "Only a KV cache of that id was deleted"), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn delete_conversation(
    state: web::Data<ApiState>,
    auth: Authorized,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let raw = id.into_inner();
    let cache_removed = match chat.pool().kv_tiers() {
        Some(tiers) => {
            // The namespace the /v1 routes key the caller's requests in:
            // never another tenant's cache.
            let key = CacheKey::new(auth.namespace.as_deref().unwrap_or_default(), raw.as_bytes());
            web::block(move || tiers.forget_key(key)).await.unwrap_or(false)
        }
        None => false,
    };
    let stored = match uuid::Uuid::parse_str(&raw) {
        Ok(id) => match visible_conversation(&state, &auth, id).await {
            Ok(conv) => Some(conv.id),
            Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(e),
        },
        Err(_) => None,
    };
    let Some(id) = stored else {
        return if cache_removed {
            Ok(HttpResponse::NoContent().finish())
        } else {
            Err(ApiError::NotFound(format!(
                "conversation {raw:?} not found: no stored conversation and no KV cache of this id in your namespace"
            )))
        };
    };
    let removed = chat.delete(id).await?;
    Ok(HttpResponse::Ok().json(Deleted { conversation_id: id.to_string(), deleted: true, messages: removed }))
}

/// What `DELETE /conversations/{id}` deleted.
#[derive(Serialize, utoipa::ToSchema)]
struct Deleted {
    conversation_id: String,
    deleted: bool,
    /// How many messages were deleted.
    messages: usize,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The `next_before` of the previous page.
    #[serde(default, deserialize_with = "super::kit::de_query")]
    pub before: Option<String>,
    /// 1–100, default 20; empty: the default.
    #[param(schema_with = super::openapi::extras::limit_100)]
    #[serde(default, deserialize_with = "super::kit::de_query")]
    pub limit: Option<i64>,
}

/// One page of conversations, newest first.
#[derive(Serialize, utoipa::ToSchema)]
struct ConversationPage {
    conversations: Vec<ConversationItem>,
    /// Pass as `before` for the next page; null at the end.
    next_before: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
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
#[utoipa::path(get, path = "/conversations", tag = "conversations", params(ListQuery),
    responses((status = 200, body = ConversationPage, links(("get_conversation" = (operation_id = "get_conversation", parameters(("id" = "$response.body#/conversations/0/conversation_id")))), ("export_conversation" = (operation_id = "export_conversation", parameters(("id" = "$response.body#/conversations/0/conversation_id")))), ("delete_conversation" = (operation_id = "delete_conversation", parameters(("id" = "$response.body#/conversations/0/conversation_id")))))), (status = "default", description = "An error", body = super::error::ErrorBody)))]
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
    let limit = limit as usize;
    let before = q.before.as_deref().map(parse_cursor).transpose()?;
    // Paged in the store, within the caller's namespace (every namespace for an admin key).
    let page = chat.conversations_page(auth.namespace.as_deref(), before, limit + 1).await?;
    let next_before = (page.len() > limit).then(|| cursor_of(&page[limit - 1]));
    let mut items = Vec::with_capacity(limit);
    for c in page.into_iter().take(limit) {
        let title = match &c.title {
            Some(t) => t.clone(),
            // A conversation deleted since the page was read has no first message: its title is empty.
            None => chat
                .store()
                .messages(&c.id, None, 1)
                .await
                .map_err(ChatError::from)?
                .first()
                .map(|m| title_of(&m.content))
                .unwrap_or_default(),
        };
        items.push(ConversationItem {
            conversation_id: c.id.to_string(),
            title,
            namespace: c.namespace,
            created_at_ms: c.created_at_ms,
        });
    }
    Ok(HttpResponse::Ok().json(ConversationPage { conversations: items, next_before }))
}

/// One conversation in the import/export format.
#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_.@:-]{1,64}$")]
    pub namespace: Option<String>,
    /// At most 200 characters; default: the first message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 200, pattern = "^[^\\u0000]*$")]
    pub title: Option<String>,
    #[schema(min_items = 1, max_items = 10000)]
    pub messages: Vec<DocumentMessage>,
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentMessage {
    /// "user" or "assistant".
    #[schema(pattern = "^(user|assistant)$")]
    pub role: String,
    /// Not blank, no U+0000, at most `max_message_chars` characters.
    #[schema(pattern = "^[^\\u0000]*\\S[^\\u0000]*$")]
    pub content: String,
    /// Milliseconds since the Unix epoch (at most the year 9999).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 253402300799999_u64)]
    pub created_at: Option<u64>,
}

fn is_json(http: &HttpRequest) -> bool {
    let ct = http.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json")
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
#[utoipa::path(post, path = "/conversations/import", tag = "conversations",
    request_body(description = "One conversation as JSON, or many as NDJSON (one such object a line)",
        content((ConversationDocument = "application/json"), (ConversationDocument = "application/x-ndjson"))),
    responses((status = 200, description = "The new conversation (an array of them for NDJSON)",
        body = ImportAnswer, links(("get_conversation" = (operation_id = "get_conversation", parameters(("id" = "$response.body#/conversation_id")))), ("export_conversation" = (operation_id = "export_conversation", parameters(("id" = "$response.body#/conversation_id")))), ("delete_conversation" = (operation_id = "delete_conversation", parameters(("id" = "$response.body#/conversation_id")))))), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn import_conversations(
    state: web::Data<ApiState>,
    auth: Authorized,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let ndjson = is_ndjson(&http);
    // A "simple" cross-site POST (text/plain, a form) from any web page the
    // user visits must not store a conversation: only JSON and NDJSON bodies.
    if !ndjson && !is_json(&http) {
        return Err(ApiError::bad(
            "Content-Type",
            "the body must be JSON (Content-Type: application/json) or NDJSON (application/x-ndjson)",
        ));
    }
    let body = super::kit::read_body(payload, state.settings.max_body_bytes).await?;
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
                    let at = if ndjson { format!("line {line}: ") } else { String::new() };
                    return Err(ApiError::bad(
                        "messages",
                        format!(
                            "{at}invalid role of message {i}: must be \"user\" or \"assistant\", got {other:?}; \
                             nothing was stored"
                        ),
                    ));
                }
            };
            messages.push(ImportMessage { role, content: m.content, created_at_ms: m.created_at });
        }
        // Every rule is checked for every line before the first is stored: a
        // bad line stores nothing, and the error names it.
        chat.check_import(doc.title.as_deref(), &messages).map_err(|e| match (ndjson, ApiError::from(e)) {
            (true, ApiError::BadRequest { param, message }) => {
                ApiError::BadRequest { param, message: format!("line {line}: {message}; nothing was stored") }
            }
            (_, e) => e,
        })?;
        documents.push((namespace, doc.title, messages));
    }
    let mut answers = Vec::with_capacity(documents.len());
    for (namespace, title, messages) in documents {
        let (conv, stored) = chat.import(&namespace, title, messages).await?;
        answers.push(Imported { conversation_id: conv.id.to_string(), messages: stored.len() });
    }
    Ok(HttpResponse::Ok().json(if ndjson {
        ImportAnswer::Many(answers)
    } else {
        ImportAnswer::One(answers.pop().expect("one conversation"))
    }))
}

/// A conversation `POST /conversations/import` stored.
#[derive(Serialize, utoipa::ToSchema)]
struct Imported {
    conversation_id: String,
    /// How many messages were stored.
    messages: usize,
}

/// One conversation for a JSON body, an array of them for NDJSON.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum ImportAnswer {
    One(Imported),
    Many(Vec<Imported>),
}

/// `GET /conversations/{id}/export`: the conversation in the import format.
#[utoipa::path(get, path = "/conversations/{id}/export", tag = "conversations", operation_id = "export_conversation",
    params(("id" = String, Path, description = "The conversation's id (a UUID)")),
    responses((status = 200, body = ConversationDocument), (status = "default", description = "An error", body = super::error::ErrorBody)))]
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
    use super::kit::resource;
    cfg.service(resource("/conversations/import", "POST").route(web::post().to(import_conversations)))
        .service(resource("/conversations/{id}/export", "GET").route(web::get().to(export_conversation)))
        .service(resource("/conversations", "GET").route(web::get().to(list_conversations)))
        .service(
            resource("/conversations/{id}", "GET, DELETE")
                .route(web::get().to(get_conversation))
                .route(web::delete().to(delete_conversation)),
        );
}
