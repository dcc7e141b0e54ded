//! The HTTP API, as routes a caller mounts on its own actix-web `App`:
//!
//! ```ignore
//! App::new().configure(modelpool_actors::http::configure(state))
//! ```
//!
//! This file only mounts the routes. What they share is in `kit` (state,
//! settings, extractors, body readers), `pipeline` (the one way a request of
//! any dialect becomes sampling, is metered and answered) and `error`. One
//! file per dialect or area translates its bodies into that pipeline and its
//! events back: `chat` (/chat), `conversations` (/conversations, import,
//! export), `openai` + `openai_reply` (/v1/chat/completions,
//! /v1/completions, /v1/models), `ollama` (/api/*), `embeddings`
//! (/v1/embeddings), `status` (/pool, /health*), `metrics` (/metrics), `page`
//! (the chat page at /), `openapi` (/openapi.json, the document of all of them).

pub mod chat;
pub mod conversations;
pub mod disconnect;
pub mod embeddings;
pub mod error;
pub mod kit;
pub mod metric_names;
pub mod metrics;
mod metrics_scrape;
pub mod ollama;
pub mod openai;
mod openai_reply;
pub mod openapi;
pub mod page;
pub mod pipeline;
mod sse;
pub mod status;
pub mod structured;
pub mod tools;

use actix_web::{web, HttpRequest, HttpResponse};

pub use error::ApiError;
pub use kit::{
    validate_namespace, ApiSettings, ApiState, Authorized, MetricsAccess, LOOPBACK_HOSTS, MAX_NAMESPACE_BYTES,
};
pub use metrics::Metrics;

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

/// Mounts every route, the shared state and the JSON rules on an `App`.
pub fn configure(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let limit = state.settings.max_body_bytes;
        cfg.app_data(web::Data::new(state))
            .app_data(kit::json_config(limit))
            .app_data(kit::query_config())
            .app_data(kit::path_config())
            .app_data(web::PayloadConfig::new(limit))
            .configure(chat::register)
            .configure(conversations::register)
            .configure(openai::register)
            .configure(embeddings::register)
            .configure(ollama::register(limit))
            .configure(status::register)
            .configure(metrics_scrape::register)
            .configure(page::register)
            .configure(openapi::register);
    }
}

/// A JSON 404 for paths no route matches; give it to `App::default_service`.
pub fn default_service() -> actix_web::Route {
    web::to(not_found)
}
