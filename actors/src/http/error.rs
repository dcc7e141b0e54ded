//! Every API error and its HTTP status, in one place. Bodies are
//! `{"error": {"type", "message", "param", "code"}}` (the OpenAI shape) on
//! every route; internal details are logged, never sent.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::chat::types::ChatError;
use crate::error::{EngineError, PoolError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or a missing/invalid field.
    #[error("{message}")]
    BadRequest { param: Option<String>, message: String },
    #[error("missing or invalid API key; send it as 'Authorization: Bearer <key>'")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not: 405 with `Allow`.
    #[error("{method} is not served on {path}; it serves {allow}")]
    MethodNotAllowed { method: String, path: String, allow: &'static str },
    /// The request names a model this server does not serve.
    #[error("the model {0:?} does not exist on this server; GET /v1/models lists the served ones")]
    ModelNotFound(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The prompt and `max_tokens` do not fit the context: 422 naming the
    /// field that holds the prompt (`messages`, `message`, `prompt`).
    #[error("{message}")]
    ContextLength { message: String, param: &'static str },
    #[error("{message}")]
    Overloaded { message: String, retry_after_secs: u64 },
    /// The client holds its share of the pool: 429.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    #[error("the server is shutting down and accepts no new requests")]
    Draining { retry_after_secs: u64 },
    #[error("the model is still loading; retry shortly")]
    Loading { retry_after_secs: u64 },
    /// The conversation store cannot write (disk full, I/O error): nothing was stored.
    #[error("the conversation store cannot write ({cause}); nothing of this request was stored")]
    StorageUnavailable { cause: String },
    /// The embedding model timed out or its thread died; it is being restarted.
    #[error("{0}")]
    EmbedderUnavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// A remote instance refused the request; the remote itself is fine.
    #[error("{0}")]
    BadGateway(String),
    /// The client hung up before its answer was ready; the work was stopped.
    #[error("the client closed the connection; the request was cancelled")]
    ClientGone,
    /// A server-side failure; the text is logged, the client gets a generic message.
    #[error("internal error")]
    Internal(String),
}

/// The body of every error (but Ollama's routes'), also the `error` event of a stream.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail<'a> {
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `request_too_large`, `context_length_exceeded`,
    /// `overloaded_error`, `rate_limit_error`, `shutting_down`, `loading`,
    /// `storage_unavailable`, `embedder_unavailable`, `timeout_error`,
    /// `upstream_error`, `cancelled` or `server_error`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// What was wrong: the field, the rule and the value sent.
    message: String,
    /// The request field at fault, if one is.
    param: Option<&'a str>,
    /// `context_length_exceeded`, `model_not_found` or `storage_unavailable`.
    code: Option<&'static str>,
}

impl ApiError {
    /// A context-length error names `field` as the one that holds the prompt.
    pub(crate) fn prompt_in(self, field: &'static str) -> Self {
        match self {
            ApiError::ContextLength { message, .. } => ApiError::ContextLength { message, param: field },
            other => other,
        }
    }

    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { param: Some(param.to_string()), message: message.into() }
    }

    /// The stable `type` string: in the body and as the metrics outcome label.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::MethodNotAllowed { .. } => "invalid_request_error",
            ApiError::ModelNotFound(_) => "invalid_request_error",
            ApiError::PayloadTooLarge { .. } => "request_too_large",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            ApiError::Overloaded { .. } => "overloaded_error",
            ApiError::TooManyRequests { .. } => "rate_limit_error",
            ApiError::Draining { .. } => "shutting_down",
            ApiError::Loading { .. } => "loading",
            ApiError::StorageUnavailable { .. } => "storage_unavailable",
            ApiError::EmbedderUnavailable(_) => "embedder_unavailable",
            ApiError::Timeout(_) => "timeout_error",
            ApiError::BadGateway(_) => "upstream_error",
            ApiError::ClientGone => "cancelled",
            ApiError::Internal(_) => "server_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } => param.as_deref(),
            ApiError::ContextLength { param, .. } => Some(param),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The JSON body, also used for error events inside a stream.
    pub fn body_json(&self) -> String {
        let message = match self {
            ApiError::Internal(_) => "internal server error".to_string(),
            other => other.to_string(),
        };
        let code = match self {
            ApiError::ContextLength { .. } => Some("context_length_exceeded"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::StorageUnavailable { .. } => Some("storage_unavailable"),
            _ => None,
        };
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail { kind: self.error_type(), message, param: self.param(), code },
        })
        .expect("serialisable")
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ContextLength { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. }
            | ApiError::Draining { .. }
            | ApiError::Loading { .. }
            | ApiError::StorageUnavailable { .. }
            | ApiError::EmbedderUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            // nginx's "client closed request": nobody reads it, but logs do.
            ApiError::ClientGone => StatusCode::from_u16(499).expect("valid status"),
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        let mut res = HttpResponse::build(self.status_code());
        match self {
            ApiError::Overloaded { retry_after_secs, .. }
            | ApiError::TooManyRequests { retry_after_secs, .. }
            | ApiError::Draining { retry_after_secs }
            | ApiError::Loading { retry_after_secs } => {
                res.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::StorageUnavailable { .. } | ApiError::EmbedderUnavailable(_) => {
                res.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
            }
            ApiError::Unauthorized => {
                res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                res.insert_header((header::ALLOW, *allow));
            }
            _ => {}
        }
        res.content_type("application/json").body(self.body_json())
    }
}

/// Seconds a client is told to wait before retrying an overloaded server.
pub const RETRY_AFTER_SECS: u64 = 1;

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParam { field, .. } => ApiError::bad(field, e.to_string()),
            EngineError::Refused { field, message } => ApiError::bad(&field, message),
            EngineError::ParserBusy { .. } => {
                ApiError::Overloaded { message: e.to_string(), retry_after_secs: RETRY_AFTER_SECS }
            }
            EngineError::PromptTooLong { .. } => ApiError::ContextLength { message: e.to_string(), param: "messages" },
            // Only the messages a client sent can make the template fail.
            EngineError::Template(_) => ApiError::bad("messages", format!("invalid messages: {e}")),
            EngineError::InputTooLong { .. } => ApiError::bad("input", e.to_string()),
            EngineError::EmbedQueueFull { .. } => {
                ApiError::Overloaded { message: e.to_string(), retry_after_secs: RETRY_AFTER_SECS }
            }
            EngineError::Embed(_) => ApiError::EmbedderUnavailable(format!("embedding failed: {e}; retry shortly")),
            EngineError::RemoteRejected(_) => ApiError::BadGateway(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::QueueFull { .. } => {
                ApiError::Overloaded { message: e.to_string(), retry_after_secs: RETRY_AFTER_SECS }
            }
            PoolError::ShuttingDown => ApiError::Draining { retry_after_secs: RETRY_AFTER_SECS },
            PoolError::ClientLimit { .. } => {
                ApiError::TooManyRequests { message: e.to_string(), retry_after_secs: RETRY_AFTER_SECS }
            }
            PoolError::AcquireTimeout { .. } | PoolError::GenerationTimeout { .. } => ApiError::Timeout(e.to_string()),
            PoolError::Engine(inner) => inner.into(),
            PoolError::InstanceFailed { .. } => {
                // Safe to tell: no paths or internals, and the client should retry.
                ApiError::Overloaded { message: e.to_string(), retry_after_secs: RETRY_AFTER_SECS }
            }
            PoolError::Startup(s) => ApiError::Internal(s),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::NotFound(id) => ApiError::NotFound(format!("conversation {id} not found")),
            ChatError::InvalidInput { field, .. } => ApiError::bad(field, e.to_string()),
            ChatError::Pool(p) => p.into(),
            ChatError::Embedding(inner) => inner.into(),
            ChatError::Store(cause) => ApiError::StorageUnavailable { cause },
            ChatError::Stopped => ApiError::Draining { retry_after_secs: RETRY_AFTER_SECS },
            ChatError::ReplyCut => ApiError::Timeout(e.to_string()),
            ChatError::Internal(s) => ApiError::Internal(s),
        }
    }
}
