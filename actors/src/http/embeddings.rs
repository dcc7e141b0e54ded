//! OpenAI-compatible `POST /v1/embeddings` on the embedding model.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::kit::{check_model, short_json, ApiState, Authorized};
use crate::error::EngineError;

/// Most inputs in one request.
const MAX_INPUTS: usize = 256;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = EmbeddingInput)]
pub enum Input {
    One(String),
    Many(Vec<String>),
    /// Token ids, as tiktoken clients send them (LangChain's `OpenAIEmbeddings`).
    Tokens(Vec<i64>),
    ManyTokens(Vec<Vec<i64>>),
}

/// OpenAI's fields: `input`, `model`, `encoding_format` (`float` or
/// `base64`), `dimensions` (only the model's own), `user` (ignored).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct EmbeddingRequest {
    /// Up to 256 texts of at most 512 tokens each, or token ids of `cl100k_base`.
    #[schema(value_type = Input)]
    pub input: Value,
    pub model: Option<String>,
    #[schema(pattern = "^(float|base64)$")]
    pub encoding_format: Option<String>,
    #[serde(default, deserialize_with = "super::kit::de_whole")]
    pub dimensions: Option<i64>,
    /// `user` and the rest: ignored, they cannot change the vectors.
    #[serde(flatten)]
    #[schema(ignore)]
    pub _other: HashMap<String, Value>,
}

fn inputs(raw: Value) -> Result<Vec<String>, ApiError> {
    let parsed: Input = serde_json::from_value(raw.clone()).map_err(|_| {
        ApiError::bad(
            "input",
            format!(
                "invalid input: must be a string, an array of strings, or token ids (an array of them, or of \
                 such arrays), got {}",
                short_json(&raw)
            ),
        )
    })?;
    let count = match &parsed {
        Input::One(_) | Input::Tokens(_) => 1,
        Input::Many(v) => v.len(),
        Input::ManyTokens(v) => v.len(),
    };
    if count == 0 || count > MAX_INPUTS {
        return Err(ApiError::bad("input", format!("invalid input: must hold 1 to {MAX_INPUTS} inputs, got {count}")));
    }
    let list = match parsed {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
        Input::Tokens(ids) => vec![cl100k_text(&ids, None)?],
        Input::ManyTokens(v) => {
            v.iter().enumerate().map(|(i, ids)| cl100k_text(ids, Some(i))).collect::<Result<_, _>>()?
        }
    };
    if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
        return Err(ApiError::bad("input", format!("invalid input[{i}]: must not be empty")));
    }
    Ok(list)
}

/// Token ids of OpenAI's `cl100k_base` encoding, which tiktoken clients send
/// for a model they do not know (LangChain's `OpenAIEmbeddings` does by
/// default), back to their text: the embedding model reads the text with its
/// own tokenizer, so the vectors are the text's.
fn cl100k_text(ids: &[i64], index: Option<usize>) -> Result<String, ApiError> {
    let field = |i: Option<usize>| match (index, i) {
        (Some(n), Some(i)) => format!("input[{n}][{i}]"),
        (Some(n), None) => format!("input[{n}]"),
        (None, Some(i)) => format!("input[{i}]"),
        (None, None) => "input".to_string(),
    };
    let ranks: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            u32::try_from(*id).map_err(|_| {
                ApiError::bad(
                    "input",
                    format!("invalid {}: a cl100k_base token id must be at least 0, got {id}", field(Some(i))),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let bytes = tiktoken_rs::cl100k_base_singleton().decode_bytes(&ranks).map_err(|e| {
        let i = ranks.iter().position(|r| *r == e.token);
        ApiError::bad("input", format!("invalid {}: not a cl100k_base token id, got {}", field(i), e.token))
    })?;
    String::from_utf8(bytes).map_err(|_| {
        ApiError::bad(
            "input",
            format!("invalid {}: the cl100k_base token ids do not decode to UTF-8 text", field(None)),
        )
    })
}

/// How vectors are written: JSON numbers, or base64 of little-endian f32 (what
/// OpenAI's official clients ask for by default).
#[derive(Clone, Copy)]
enum Encoding {
    Float,
    Base64,
}

fn encoding(raw: Option<&str>) -> Result<Encoding, ApiError> {
    match raw {
        None | Some("float") => Ok(Encoding::Float),
        Some("base64") => Ok(Encoding::Base64),
        Some(other) => Err(ApiError::bad(
            "encoding_format",
            format!("invalid encoding_format: must be \"float\" or \"base64\", got {other:?}"),
        )),
    }
}

fn encode(v: Vec<f32>, enc: Encoding) -> Value {
    match enc {
        Encoding::Float => json!(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// OpenAI's embeddings, on the embedding model (unit-length vectors).
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest,
    responses((status = 200, body = super::openapi::bodies::EmbeddingList),
        (status = "default", description = "An error", body = super::error::ErrorBody)))]
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
    let embedder = chat.embedder();
    check_model(req.model.as_deref(), embedder.model_name())?;
    let enc = encoding(req.encoding_format.as_deref())?;
    if let Some(d) = req.dimensions.filter(|d| *d != embedder.dim() as i64) {
        return Err(ApiError::bad(
            "dimensions",
            format!("invalid dimensions: this model has exactly {} dimensions, got {d}", embedder.dim()),
        ));
    }
    // Token ids are decoded off the worker (the encoding loads on first use).
    let input = req.input;
    let texts = web::block(move || inputs(input))
        .await
        .map_err(|_| ApiError::Internal("reading the input panicked".into()))??;
    // Counted with the embedding model's own tokenizer; nothing is cut silently.
    let limit = embedder.token_limit();
    let mut tokens = 0usize;
    for (index, t) in texts.iter().enumerate() {
        let n = embedder.count_tokens(t);
        if n > limit {
            return Err(EngineError::InputTooLong { index, tokens: n, limit }.into());
        }
        tokens += n;
    }
    let vectors = embedder.embed(texts).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({ "object": "embedding", "index": i, "embedding": encode(v, enc) }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": embedder.model_name(),
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(super::kit::resource("/v1/embeddings", "POST").route(web::post().to(embeddings)));
}
