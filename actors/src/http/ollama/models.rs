//! What Ollama's clients ask about models: `tags`, `ps`, `show`, `version`,
//! and the routes that manage models, which say that this server serves the
//! models it was started with.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::reply::{now_rfc3339, ollama_error, reply};
use super::request::check_name;
use crate::http::error::ApiError;
use crate::http::kit::{ApiState, Authorized};

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

/// The served models as Ollama lists them.
#[utoipa::path(get, path = "/api/tags", tag = "ollama", responses((status = 200, body = crate::http::openapi::bodies::OllamaModels), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
pub(super) async fn api_tags(state: web::Data<ApiState>, _auth: Authorized) -> HttpResponse {
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
#[utoipa::path(get, path = "/api/ps", tag = "ollama", responses((status = 200, body = crate::http::openapi::bodies::OllamaModels), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
pub(super) async fn api_ps(state: web::Data<ApiState>, _auth: Authorized) -> HttpResponse {
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

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OllamaShowRequest)]
pub struct ShowBody {
    pub model: Option<String>,
    pub name: Option<String>,
    pub verbose: Option<bool>,
}

/// One served model, as Ollama describes it.
#[utoipa::path(post, path = "/api/show", tag = "ollama", request_body = ShowBody,
    responses((status = 200, body = crate::http::openapi::bodies::OllamaShow), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
pub(super) async fn api_show(state: web::Data<ApiState>, _auth: Authorized, body: web::Json<ShowBody>) -> HttpResponse {
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

#[utoipa::path(get, path = "/api/version", tag = "ollama", responses((status = 200, body = crate::http::openapi::bodies::OllamaVersion)))]
pub(super) async fn api_version() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// pull, push, create, copy, delete, blobs: this server does not manage models.
pub(super) async fn api_manage(req: HttpRequest) -> HttpResponse {
    let route = req.path().to_string();
    ollama_error(ApiError::bad(
        "model",
        format!(
            "{route} is not available: this server serves the models it was started with (model and \
             embedding_model in its configuration); it does not pull, push, create, copy or delete models"
        ),
    ))
}
