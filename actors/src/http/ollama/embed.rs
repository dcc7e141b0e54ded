//! Ollama's embedding routes: `/api/embed` (a string or an array of them)
//! and the older `/api/embeddings` (one prompt), served by the embedding
//! model the conversation memory uses.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::reply::reply;
use super::request::{check_name, refuse};
use crate::http::error::ApiError;
use crate::http::kit::{ApiState, Authorized};

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OllamaEmbedRequest)]
pub struct EmbedBody {
    pub model: Option<String>,
    /// `/api/embed`: a string or an array of strings.
    #[schema(value_type = Option<crate::http::openapi::extras::OllamaEmbedInput>)]
    pub input: Option<Value>,
    /// `/api/embeddings` (the older route): one string.
    pub prompt: Option<String>,
    pub truncate: Option<bool>,
    #[serde(default, deserialize_with = "crate::http::kit::de_whole")]
    pub dimensions: Option<i64>,
    /// Ignored: nothing of them changes an embedding.
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

/// Ollama's embeddings of `input` (a string or an array of strings).
#[utoipa::path(post, path = "/api/embed", tag = "ollama", request_body = EmbedBody,
    responses((status = 200, body = crate::http::openapi::bodies::OllamaEmbed), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
pub(super) async fn api_embed(
    state: web::Data<ApiState>,
    _auth: Authorized,
    body: web::Json<EmbedBody>,
) -> HttpResponse {
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

/// Ollama's older embeddings route: one `prompt`.
#[utoipa::path(post, path = "/api/embeddings", tag = "ollama", request_body = crate::http::openapi::extras::OllamaEmbeddingsRequest,
    responses((status = 200, body = crate::http::openapi::bodies::OllamaEmbedding), (status = "default", description = "An error", body = crate::http::openapi::bodies::OllamaError)))]
pub(super) async fn api_embeddings(
    state: web::Data<ApiState>,
    _auth: Authorized,
    body: web::Json<EmbedBody>,
) -> HttpResponse {
    reply(async {
        let text =
            body.prompt.clone().ok_or_else(|| ApiError::bad("prompt", "invalid prompt: required, got nothing"))?;
        let (mut vectors, _) = embed_texts(&state, &body, vec![text]).await?;
        Ok(HttpResponse::Ok().json(json!({ "embedding": vectors.pop().unwrap_or_default() })))
    })
    .await
}
