//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated
//! from the request and response types and each handler's annotation
//! (`#[utoipa::path]` beside the handler). [`bodies`] describes the answers
//! the generation routes write piece by piece, [`extras`] the fields read by
//! name from the rest of a body. `tests/api_fuzz.rs` sends what this document
//! allows (and what it does not) and checks every answer against it.

pub mod bodies;
pub mod extras;

use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use utoipa::openapi::path::{HttpMethod, OperationBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "modelpool",
        description = "LLMs kept loaded and shared: chat with memory (`/chat`), OpenAI's and Ollama's APIs, \
                       the pool's status. Errors are `{\"error\": {\"type\", \"message\", \"param\", \"code\"}}` \
                       (Ollama's routes: `{\"error\": \"…\"}`). With API keys configured, send \
                       `Authorization: Bearer <key>`."
    ),
    paths(
        super::chat::chat,
        super::conversations::list_conversations,
        super::conversations::get_conversation,
        super::conversations::delete_conversation,
        super::conversations::import_conversations,
        super::conversations::export_conversation,
        super::openai::chat_completions,
        super::openai::text_completions,
        super::openai::models,
        super::openai::model,
        super::embeddings::embeddings,
        super::ollama::api_chat,
        super::ollama::api_generate,
        super::ollama::embed::api_embed,
        super::ollama::embed::api_embeddings,
        super::ollama::models::api_tags,
        super::ollama::models::api_ps,
        super::ollama::models::api_show,
        super::ollama::models::api_version,
        super::status::pool,
        super::status::capacity,
        super::status::ready,
        super::status::live,
        super::metrics_scrape::metrics,
        super::page::index,
        super::page::script,
        super::page::style,
        openapi_json,
    ),
    modifiers(&Completed),
)]
struct ApiDoc;

/// What the annotations cannot say: the version, the bearer key, the routes
/// one handler serves under several paths, and Ollama's model management
/// routes (each a 400: this server serves the models it started with).
struct Completed;

impl Modify for Completed {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Keys are optional (none configured: open), so is the requirement.
        doc.security = Some(vec![
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new()),
            Default::default(),
        ]);
        if let Some(health) = doc.paths.paths.get("/health").cloned() {
            let mut ready = health;
            if let Some(op) = ready.get.as_mut() {
                op.operation_id = Some("health_ready".into());
            }
            doc.paths.paths.insert("/health/ready".into(), ready);
        }
        let refused = || {
            OperationBuilder::new()
                .tag("ollama")
                .summary(Some("Refused (400): this server serves the models it was started with"))
                .response(
                    "400",
                    ResponseBuilder::new().description("Not available on this server").content(
                        "application/json",
                        ContentBuilder::new().schema(Some(Ref::from_schema_name("OllamaError"))).build(),
                    ),
                )
        };
        for (path, methods) in [
            ("/api/pull", &[("post", HttpMethod::Post)][..]),
            ("/api/push", &[("post", HttpMethod::Post)]),
            ("/api/create", &[("post", HttpMethod::Post)]),
            ("/api/copy", &[("post", HttpMethod::Post)]),
            ("/api/delete", &[("delete", HttpMethod::Delete)]),
            ("/api/blobs/{digest}", &[("head", HttpMethod::Head), ("post", HttpMethod::Post)]),
        ] {
            for (name, method) in methods {
                let route = path.trim_start_matches("/api/").split('/').next().unwrap_or(path);
                let mut op = refused().operation_id(Some(format!("ollama_{route}_{name}")));
                if path.contains("{digest}") {
                    op = op.parameter(
                        utoipa::openapi::path::ParameterBuilder::new()
                            .name("digest")
                            .parameter_in(utoipa::openapi::path::ParameterIn::Path)
                            .required(utoipa::openapi::Required::True)
                            .schema(Some(
                                utoipa::openapi::ObjectBuilder::new()
                                    .schema_type(utoipa::openapi::schema::Type::String),
                            )),
                    );
                }
                doc.paths.add_path_operation(path, vec![method.clone()], op.build());
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
        camel_case_links(&mut doc);
        serde_json::to_string_pretty(&doc).expect("the document serialises")
    })
}

/// utoipa 5 writes a Link object's `operationId` and `requestBody` in
/// snake case; OpenAPI (and every client that follows links) reads camel case.
fn camel_case_links(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(links)) = map.get_mut("links") {
                for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                    for (from, to) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                        ("request_body", "requestBody"),
                    ] {
                        if let Some(x) = link.remove(from) {
                            link.insert(to.to_string(), x);
                        }
                    }
                }
            }
            map.values_mut().for_each(camel_case_links);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(camel_case_links),
        _ => {}
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "status",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content((Object = "application/json")))))]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(document())
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(super::kit::resource("/openapi.json", "GET").route(web::get().to(openapi_json)));
}
