//! The HTTP API, as routes a caller mounts on its own actix-web `App`:
//!
//! ```ignore
//! App::new().configure(modelpool_actors::http::configure(state))
//! ```
//!
//! One file per area: `chat` (/chat, /conversations), `openai`
//! (/v1/chat/completions, /v1/models), `embeddings` (/v1/embeddings),
//! `status` (/pool, /health*), `metrics` (/metrics).

pub mod chat;
pub mod embeddings;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod status;

use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use actix_web::dev::Payload;
use actix_web::error::JsonPayloadError;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};

pub use error::ApiError;
pub use metrics::Metrics;

use crate::chat_handle::ChatHandle;
use crate::params::SamplingParams;

/// Settings of the API layer.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Accepted bearer keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Whether /metrics needs a key too (when keys are set).
    pub metrics_require_key: bool,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self { api_keys: Vec::new(), metrics_require_key: false, max_body_bytes: 1 << 20 }
    }
}

/// Sampling fields a request may set; the rest are the configured defaults.
#[derive(Default)]
pub(crate) struct SamplingOverrides {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u32>,
}

/// What the routes share.
#[derive(Clone)]
pub struct ApiState {
    /// Set once the pool and the chat layer are up; until then the API answers 503.
    chat: Arc<OnceLock<ChatHandle>>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<ApiSettings>,
    draining: Arc<AtomicBool>,
}

impl ApiState {
    /// State for routes in front of a running chat layer.
    pub fn new(chat: ChatHandle, settings: ApiSettings) -> Self {
        let state = Self::loading(settings);
        state.attach(chat);
        state
    }

    /// State for a server that listens while the model loads: the health
    /// checks answer 503 "loading", other routes 503, until [`Self::attach`].
    pub fn loading(settings: ApiSettings) -> Self {
        Self {
            chat: Arc::new(OnceLock::new()),
            metrics: Arc::new(Metrics::new()),
            settings: Arc::new(settings),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The chat layer is up: start serving.
    pub fn attach(&self, chat: ChatHandle) {
        let _ = self.chat.set(chat);
    }

    /// The chat layer, or 503 while it is still loading.
    pub fn chat(&self) -> Result<&ChatHandle, ApiError> {
        self.chat.get().ok_or(ApiError::Loading { retry_after_secs: error::RETRY_AFTER_SECS })
    }

    /// The configured sampling with a request's overrides, validated; the
    /// error names the field, the rule and the value.
    pub(crate) fn sampling(&self, o: SamplingOverrides) -> Result<SamplingParams, ApiError> {
        let chat = self.chat()?;
        let mut s = chat.options().sampling.clone();
        s.max_tokens = o.max_tokens.unwrap_or(s.max_tokens);
        s.temperature = o.temperature.unwrap_or(s.temperature);
        s.top_p = o.top_p.unwrap_or(s.top_p);
        s.seed = o.seed.or(s.seed);
        s.validate()?;
        let n_ctx = chat.pool().options().instance.n_ctx;
        if s.max_tokens >= n_ctx {
            return Err(ApiError::bad(
                "max_tokens",
                format!("invalid max_tokens: must be less than the context size n_ctx={n_ctx}, got {}", s.max_tokens),
            ));
        }
        Ok(s)
    }

    /// From now on: readiness fails and new generation requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new work while draining.
    pub(crate) fn admit(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            return Err(ApiError::Draining { retry_after_secs: error::RETRY_AFTER_SECS });
        }
        Ok(())
    }
}

fn check_key(req: &HttpRequest, keys: &[String]) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k) if keys.iter().any(|key| key == k) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

fn state_of(req: &HttpRequest) -> Result<&ApiState, ApiError> {
    req.app_data::<web::Data<ApiState>>()
        .map(|d| d.get_ref())
        .ok_or_else(|| ApiError::Internal("ApiState is not registered".into()))
}

/// Extractor: the request carries a valid API key (or none are configured).
pub struct Authorized;

impl FromRequest for Authorized {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(state_of(req).and_then(|s| check_key(req, &s.settings.api_keys)).map(|_| Authorized))
    }
}

/// Extractor: /metrics access (open unless `metrics_require_key`).
pub struct MetricsAccess;

impl FromRequest for MetricsAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            state_of(req)
                .and_then(
                    |s| {
                        if s.settings.metrics_require_key {
                            check_key(req, &s.settings.api_keys)
                        } else {
                            Ok(())
                        }
                    },
                )
                .map(|_| MetricsAccess),
        )
    }
}

/// JSON bodies: size limit → 413, anything malformed → 400 naming the problem.
fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default().limit(limit).error_handler(move |err, _| {
        let api = match &err {
            JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
                ApiError::PayloadTooLarge { limit }
            }
            JsonPayloadError::ContentType => {
                ApiError::bad("Content-Type", "the body must be JSON with Content-Type: application/json")
            }
            JsonPayloadError::Deserialize(e) => {
                ApiError::BadRequest { param: None, message: format!("invalid JSON body: {e}") }
            }
            other => ApiError::BadRequest { param: None, message: format!("could not read the body: {other}") },
        };
        api.into()
    })
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| {
        ApiError::BadRequest { param: None, message: format!("invalid query string: {err}") }.into()
    })
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|err, _| ApiError::BadRequest { param: None, message: format!("invalid path: {err}") }.into())
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

/// Mounts every route, the shared state and the JSON rules on an `App`.
pub fn configure(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let limit = state.settings.max_body_bytes;
        cfg.app_data(web::Data::new(state))
            .app_data(json_config(limit))
            .app_data(query_config())
            .app_data(path_config())
            .app_data(web::PayloadConfig::new(limit))
            .configure(chat::register)
            .configure(openai::register)
            .configure(embeddings::register)
            .configure(status::register)
            .configure(metrics::register);
    }
}

/// A JSON 404 for paths no route matches; give it to `App::default_service`.
pub fn default_service() -> actix_web::Route {
    web::to(not_found)
}

/// A server-sent-events response fed by `rx`. Uncompressed and uncached, so
/// every event reaches the client as soon as it is sent.
pub(crate) fn sse_response(rx: tokio::sync::mpsc::Receiver<actix_web_lab::sse::Event>) -> HttpResponse {
    use actix_web::http::header::{CacheControl, CacheDirective, ContentEncoding};
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(ContentEncoding::Identity)
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .body(actix_web_lab::sse::Sse::from_infallible_receiver(rx))
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
