//! OpenAI-compatible `POST /v1/embeddings` on the embedding model.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiState, Authorized};

/// Most inputs in one request.
const MAX_INPUTS: usize = 256;

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct EmbeddingRequest {
    pub input: Value,
    pub model: Option<String>,
    pub encoding_format: Option<String>,
    #[serde(flatten)]
    pub _other: HashMap<String, Value>,
}

fn inputs(raw: Value) -> Result<Vec<String>, ApiError> {
    let parsed: Input = serde_json::from_value(raw.clone()).map_err(|_| {
        ApiError::bad("input", format!("invalid input: must be a string or an array of strings, got {}", short(&raw)))
    })?;
    let list = match parsed {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
    };
    if list.is_empty() || list.len() > MAX_INPUTS {
        return Err(ApiError::bad(
            "input",
            format!("invalid input: must hold 1 to {MAX_INPUTS} strings, got {}", list.len()),
        ));
    }
    if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
        return Err(ApiError::bad("input", format!("invalid input[{i}]: must not be empty")));
    }
    Ok(list)
}

/// The first 60 characters of a JSON value, for error messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

async fn embeddings(
    state: web::Data<ApiState>,
    _auth: Authorized,
    body: web::Json<EmbeddingRequest>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let result = embeddings_inner(&state, body.into_inner()).await;
    let outcome = result.as_ref().err().map(|e| e.error_type()).unwrap_or("ok");
    state.metrics.request("embeddings", outcome, Some(started.elapsed()));
    result
}

async fn embeddings_inner(state: &ApiState, req: EmbeddingRequest) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    if let Some(f) = req.encoding_format.as_deref().filter(|f| *f != "float") {
        return Err(ApiError::bad(
            "encoding_format",
            format!("invalid encoding_format: only \"float\" is supported, got {f:?}"),
        ));
    }
    let texts = inputs(req.input)?;
    let tokens: u32 = texts.iter().map(|t| chat.pool().engine().count_tokens(t)).sum();
    let vectors = chat.embedder().embed(texts).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({ "object": "embedding", "index": i, "embedding": v }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": chat.embedder().model_name(),
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/embeddings", web::post().to(embeddings));
}
